"""Training metrics: the FLOPs model behind MFU, and the JSONL/TensorBoard writer."""

import json
import pathlib

from cadenza.models.config import ModelConfig

# Dense bf16 peak FLOP/s per device, matched by substring of ``device.device_kind``.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v6 lite": 918e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v4": 275e12,
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


class MetricsWriter:
    """Appends one JSON object per logged step to ``<dir>/metrics.jsonl`` and, when
    ``tensorboard``, scalars to TensorBoard event files under ``<dir>/tensorboard``.

    ``resume_at(step)`` drops JSONL lines of steps after ``step`` (written by a run that
    was killed after its last checkpoint), so a resumed run's file is one clean curve.
    """

    def __init__(self, directory, tensorboard: bool = True):
        self.path = pathlib.Path(directory) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(pathlib.Path(directory) / "tensorboard"))
        self._file = None

    def resume_at(self, step: int) -> None:
        if self.path.exists():
            lines = [ln for ln in self.path.read_text().splitlines()
                     if ln.strip() and json.loads(ln)["step"] <= step]
            self.path.write_text("".join(ln + "\n" for ln in lines))

    def write(self, step: int, metrics: dict) -> None:
        """Log ``metrics`` (name -> float or None) at ``step``; None values are skipped."""
        if self._file is None:
            self._file = open(self.path, "a")
        record = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
