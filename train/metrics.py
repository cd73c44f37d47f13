"""Training metrics: the FLOPs model behind MFU, the devices' peaks (FLOP/s and HBM
bytes/s), and the JSONL/TensorBoard writer."""

import json
import pathlib

from cadenza.models.config import ModelConfig

# Dense bf16 peak FLOP/s per device, matched by substring of ``device.device_kind``.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v6 lite": 918e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v4": 275e12,
}

# Peak HBM bandwidth in bytes/s per device (vendor figures), matched like PEAK_FLOPS;
# the roofline of memory-bound work (decode steps, attention over a KV cache).
PEAK_HBM = {
    "H200": 4.8e12, "H100": 3.35e12, "A100": 2.04e12, "L4": 3.0e11,
    "TPU v6 lite": 1.64e12, "TPU v5 lite": 8.19e11, "TPU v5e": 8.19e11, "TPU v5p": 2.765e12,
    "TPU v5": 2.765e12, "TPU v4": 1.2e12,
}


def matmul_params(config: ModelConfig) -> int:
    """Params that take part in one token's matmuls: the active ones
    (:meth:`~cadenza.models.config.ModelConfig.num_active_params`: for a mixture of
    experts only the ``num_experts_per_tok`` chosen experts, plus the router) but the
    input embedding table when it is not tied to the output projection (the lookup is a
    gather); norms are counted (negligible)."""
    embed = config.vocab_size * config.hidden_size
    return config.num_active_params() - (0 if config.tie_embeddings else embed)


def flops_per_token(config: ModelConfig, seq_len: int, trainable_params: int | None = None):
    """Training FLOPs per token of one forward + backward pass.

    With ``N`` = :func:`matmul_params` (active params for MoE) and ``N_t`` the trainable
    ones (``None``: all active ones, full fine-tuning; for PEFT the adapter param count):

    * forward matmuls ``2 N``;
    * backward: gradients w.r.t. activations flow through every layer, ``2 N``;
      gradients w.r.t. weights only for trainable params, ``2 N_t``;
    * attention scores and weighted sums: forward ``4 L T H d_head`` (QK^T and PV, the
      full T x T square, no causal or sliding-window discount), backward twice that,
      ``12 L T H d_head`` in all.

    So full fine-tuning gives the usual ``6 N + 12 L T H d_head``. Remat recomputation
    is not counted (MFU counts useful work only).
    """
    n = matmul_params(config)
    n_t = n if trainable_params is None else trainable_params
    attn = 12 * config.num_layers * seq_len * config.num_heads * config.resolved_head_dim
    return 4 * n + 2 * n_t + attn


def peak_flops_per_device(device, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of ``device``: ``override_tflops * 1e12`` if set, else from
    :data:`PEAK_FLOPS` by device kind, else None (no MFU is reported)."""
    if override_tflops:
        return override_tflops * 1e12
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops
    return None


def peak_hbm_bytes_per_s(device) -> float | None:
    """Peak HBM bandwidth of ``device`` from :data:`PEAK_HBM` by device kind, else None
    (CPU: no roofline is reported)."""
    kind = getattr(device, "device_kind", "")
    return next((bw for name, bw in PEAK_HBM.items() if name in kind), None)


def tensorboard_tag(name: str) -> str:
    """The namespaced TensorBoard tag of a metric: ``eval_loss`` -> ``eval/loss``, anything
    else under ``train/`` (``loss`` -> ``train/loss``)."""
    return f"eval/{name[5:]}" if name.startswith("eval_") else f"train/{name}"


def flat_hparams(config) -> dict:
    """The experiment ``config`` (a dataclass) as ``{"section.field": value}`` with
    str/int/float/bool values (lists and None become strings), for trackers'
    hyperparameter tables."""
    import dataclasses

    out = {}

    def walk(prefix, value):
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}{f.name}.", getattr(value, f.name))
        else:
            key = prefix[:-1]
            out[key] = value if isinstance(value, (str, int, float, bool)) else str(value)

    walk("", config)
    return out


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``, ``3720`` -> ``1h02m``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class JsonlMetrics:
    """One JSON object per logged step in ``<dir>/metrics.jsonl``.

    ``resume_at(step)`` drops lines of steps after ``step`` (written by a run that was
    killed after its last checkpoint), so a resumed run's file is one clean curve.
    """

    def __init__(self, directory):
        self.path = pathlib.Path(directory) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None

    def resume_at(self, step: int) -> None:
        if self.path.exists():
            lines = [ln for ln in self.path.read_text().splitlines()
                     if ln.strip() and json.loads(ln)["step"] <= step]
            self.path.write_text("".join(ln + "\n" for ln in lines))

    def write(self, step: int, record: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps({"step": step, **record}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class TensorBoardMetrics:
    """Scalars under ``<dir>/tensorboard`` with namespaced tags (:func:`tensorboard_tag`)
    and, when given, the run's hyperparameters (the HParams dashboard) and config text."""

    def __init__(self, directory, hparams: dict | None = None, config_text: str | None = None):
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams as hparams_summaries

        self._tb = SummaryWriter(str(pathlib.Path(directory) / "tensorboard"))
        if hparams:
            for summary in hparams_summaries(hparams, {"train/loss": 0.0, "eval/loss": 0.0}):
                self._tb.file_writer.add_summary(summary)
        if config_text:
            self._tb.add_text("config", f"```\n{config_text}\n```", 0)

    def write(self, step: int, record: dict) -> None:
        for k, v in record.items():
            self._tb.add_scalar(tensorboard_tag(k), v, step)

    def close(self) -> None:
        self._tb.close()


class TextLogMetrics:
    """Plain-text lines (``step 10/100 | loss 2.3456 | ... | eta 1m15s``) appended to
    ``<dir>/train.log`` and, with ``echo``, printed to stdout. The ETA comes from the
    measured step time, which excludes compilation."""

    KEYS = (("loss", "{:.4f}"), ("eval_loss", "{:.4f}"), ("lr", "{:.2e}"),
            ("grad_norm", "{:.3f}"), ("tokens_per_s", "{:.0f}"), ("step_time_s", "{:.3f}"),
            ("mfu", "{:.1%}"))

    def __init__(self, directory, total_steps: int, name: str = "", echo: bool = True):
        self.path = pathlib.Path(directory) / "train.log"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.total, self.name, self.echo = total_steps, name, echo
        self._file = None

    def line(self, step: int, record: dict) -> str:
        """The log line of ``record`` at ``step``."""
        parts = [f"{self.name} step {step}/{self.total}".strip()]
        parts += [f"{k} {fmt.format(record[k])}" for k, fmt in self.KEYS
                  if record.get(k) is not None]
        if record.get("step_time_s") and step < self.total:
            parts.append(f"eta {format_duration(record['step_time_s'] * (self.total - step))}")
        return " | ".join(parts)

    def write(self, step: int, record: dict) -> None:
        text = self.line(step, record)
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(text + "\n")
        self._file.flush()
        if self.echo:
            print(text, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class WandbMetrics:
    """Weights & Biases run in ``project`` (the ``wandb`` extra; ``WANDB_MODE=offline``
    writes it locally under ``<dir>/wandb`` for a later ``wandb sync``): namespaced
    metrics as TensorBoard's, the hyperparameters as the run config."""

    def __init__(self, directory, project: str, name: str, hparams: dict | None = None):
        try:
            import wandb
        except ImportError:
            from cadenza.errors import ConfigError

            raise ConfigError("train.wandb_project is set but wandb is not installed",
                              where="train.wandb_project",
                              fix="pip install 'cadenza[wandb]', or unset it") from None
        self._run = wandb.init(project=project, name=name, dir=str(directory),
                               config=hparams or {}, reinit="finish_previous")

    def write(self, step: int, record: dict) -> None:
        self._run.log({tensorboard_tag(k): v for k, v in record.items()}, step=step, commit=True)

    def close(self) -> None:
        self._run.finish()


class MetricsWriter:
    """Sends each logged step to every backend: :class:`JsonlMetrics` always, plus those
    given (:class:`TensorBoardMetrics`, :class:`TextLogMetrics`, :class:`WandbMetrics`,
    or anything with ``write(step, record)`` and ``close()``).

    ``resume_at(step)``: see :class:`JsonlMetrics`.
    """

    def __init__(self, directory, backends=()):
        self.jsonl = JsonlMetrics(directory)
        self.path = self.jsonl.path
        self.backends = [self.jsonl, *backends]

    def resume_at(self, step: int) -> None:
        self.jsonl.resume_at(step)

    def write(self, step: int, metrics: dict) -> None:
        """Log ``metrics`` (name -> float or None) at ``step``; None values are skipped."""
        record = {k: v for k, v in metrics.items() if v is not None}
        for backend in self.backends:
            backend.write(step, record)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
