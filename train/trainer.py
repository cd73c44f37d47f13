"""``fit``: the training loop — sharded state, jitted steps, checkpoints, metrics, eval.

One code path for one CPU, one GPU and a TPU pod: everything is placed with
explicit ``NamedSharding`` s on the configured mesh, the step is one jitted
function with the state donated, and host-local data batches become global
arrays with the batch sharding.
"""

import dataclasses
import json
import pathlib
import signal
import sys
import threading
import time

import jax
import numpy as np
from tqdm import tqdm

from cadenza.config import ExperimentConfig
from cadenza.errors import CadenzaError, ConfigError
from cadenza.outputs import OutputLock, atomic_dir, is_complete
from cadenza.remote import RunMirror, is_remote
from cadenza.train.checkpoints import Checkpoints
from cadenza.train.mesh import batch_sharding, make_mesh, replicated, validate_sharding
from cadenza.train.metrics import MetricsWriter, flops_per_token, peak_flops_per_device
from cadenza.train.optim import make_optimizer, make_schedule
from cadenza.train.state import abstract_state, init_state, state_shardings
from cadenza.train.step import BATCH_KEYS, make_eval_step, make_train_step
from cadenza.train.task import TrainTask, full_model_task

# Metrics every step reports (a task's extra metrics are the others).
_STEP_METRICS = ("loss", "objective", "grad_norm", "lr", "tokens", "finite")


class NonFiniteError(CadenzaError):
    """The loss or gradient norm became NaN/inf; the run stopped without saving after it."""


class _StopSignals:
    """Turns SIGTERM and the first Ctrl-C (SIGINT) into a flag the loop polls (only in the
    main thread): the run saves a checkpoint and stops. ``received`` is "sigterm",
    "sigint" or None; a second Ctrl-C interrupts at once (KeyboardInterrupt)."""

    _NAMES = {signal.SIGTERM: "sigterm", signal.SIGINT: "sigint"}

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self._NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received == "sigint" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or self._NAMES[signum]
        if signum == signal.SIGINT:
            print("\ncadenza: interrupted: saving a checkpoint, then stopping (Ctrl-C again "
                  "to stop without saving)", file=sys.stderr)

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _global_batch(batch: dict, sharding, config: ExperimentConfig) -> dict:
    """Host-local numpy rows -> global jax.Arrays [batch_size, seq_len, ...] with ``sharding``.

    The :data:`BATCH_KEYS` are required; extra keys (a task's own per-position arrays,
    e.g. LUD's ``lud_group``) are converted the same way and passed through to the task.
    """
    rows = config.train.batch_size // jax.process_count()
    out = {}
    for k in BATCH_KEYS:
        if k not in batch:
            raise CadenzaError(f"the data batch has no {k!r} array (keys: {sorted(batch)})",
                               where="data iterator",
                               fix=f"yield dicts with the keys {list(BATCH_KEYS)}")
    for k in batch:
        a = np.asarray(batch[k])
        if a.shape[:2] != (rows, config.train.seq_len):
            raise CadenzaError(f"batch[{k!r}] has shape {a.shape}, expected "
                               f"({rows}, {config.train.seq_len}, ...)", where="data iterator",
                               fix="yield train.batch_size // process_count rows of "
                                   "train.seq_len tokens")
        out[k] = jax.make_array_from_process_local_data(
            sharding, a, (config.train.batch_size, *a.shape[1:]))
    return out


def _build_iterator(config: ExperimentConfig, split: str):
    """The data section's iterator for ``split`` (on-policy distillation: the teacher's
    generations for training, :mod:`cadenza.train.distill_data`)."""
    from cadenza.train.data import build_iterator

    host = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    data = build_iterator(config, split=split, **host)
    if split == "train" and config.train.task == "distill" and config.train.distill.on_policy:
        from cadenza.train.distill_data import on_policy_iterator

        return on_policy_iterator(config, data, **host)
    return data


def fit(config: ExperimentConfig, data=None, eval_data=None, *,
        task: TrainTask | None = None, devices=None, allow_changes: bool = False) -> dict:
    """Train ``config`` for ``config.train.steps`` updates; resume if its output dir holds a
    checkpoint.

    Args:
      config: the resolved experiment.
      data: an iterator of host-local batches (dicts of [batch_size // process_count,
        seq_len] arrays, see :mod:`cadenza.train.step`) with ``get_state()`` /
        ``set_state(state)``; None builds ``cadenza.train.data.build_iterator(config,
        split="train", ...)``. The directory of an optional ``tokenizer`` attribute is
        copied into the exported model directory.
      eval_data: the same for held-out batches (rewound with ``set_state`` before every
        eval); None builds ``split="test"`` when ``train.eval_every > 0``.
      task: the trainable/frozen split (default: :func:`full_model_task`; PEFT passes its
        own).
      devices: the devices of the mesh (default: all of ``jax.devices()``).
      allow_changes: resume even though training hyperparameters (learning rate, steps,
        batch size, ...) differ from the checkpoint's; the changes are recorded in
        ``checkpoints/changes.jsonl`` and ``checkpoints/config.yaml`` is updated. Without
        it such a resume is refused with the list of changed fields.

    Writes to ``train.output_dir``: ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``
    and, when the run completes, ``model/`` (``cadenza.models.save_model``). The
    directory is locked for the run (``.cadenza.lock``, see :class:`cadenza.outputs.
    OutputLock`); ``model/`` and ``adapters/`` are written under temporary names and
    renamed when complete, and a rerun of a completed run rewrites any that are missing
    or incomplete (e.g. after a SIGKILL during the export).

    Returns a summary dict: ``step`` (updates done), ``loss`` (last), ``eval_loss``
    (last, or None), ``resumed_from`` (step or None), ``skipped_checkpoints`` (newer
    checkpoints that failed verification on resume: ``[{"step", "reason"}]``),
    ``stopped`` ("completed", "sigterm" or "sigint": the latter two saved a checkpoint
    first), ``skipped_records`` (bad records left out of the data by reason, ``{"build",
    "formatting", "total"}``; None for iterators without counts), ``tokens_per_s``,
    ``step_time_s``, ``mfu`` (None when the device peak is unknown), ``compile_s``,
    ``output_dir``, ``model_dir`` and ``adapters_dir``
    (None if stopped early or not written: prefix/prompt tuning has no merged model,
    full training no adapters).

    Raises:
      ConfigError: mesh/batch/model shapes that do not fit the devices, or a quantised
        model config (model.weight_quant; before compiling).
      NonFiniteError: a non-finite loss or gradient; names the step, and no checkpoint
        is written for it or any later step.
      CadenzaError: an incompatible checkpoint in the output dir, changed hyperparameters
        (without ``allow_changes``), another run holding the output dir, no checkpoint that
        restores, malformed batches.
    """
    devices = jax.devices() if devices is None else list(devices)
    if config.model.weight_quant != "none":
        raise ConfigError(f"model.weight_quant={config.model.weight_quant}: cadenza trains "
                          "float weights", where="model.weight_quant",
                          fix="train the float model and quantise it afterwards ('cadenza "
                              "convert quantize'), or train adapters on a quantised base "
                              "with peft.method=qlora")
    validate_sharding(config, len(devices))
    if is_remote(config.train.output_dir):
        return _fit_remote(config, data, eval_data, task, devices, allow_changes)
    with OutputLock(config.train.output_dir) as lock:
        if lock.stale:
            print(f"cadenza: took over the lock of a run that is gone: {lock.stale}",
                  file=sys.stderr)
        return _fit(config, data, eval_data, task, devices, allow_changes)


def _fit_remote(config, data, eval_data, task, devices, allow_changes) -> dict:
    """``train.output_dir`` is a URL: train in a local mirror of it
    (:class:`cadenza.remote.RunMirror`: pulled first, so the run resumes; pushed after every
    checkpoint, at the end and when the run fails). The summary names the URL."""
    url = config.train.output_dir.rstrip("/")
    if jax.process_count() > 1:
        raise ConfigError("a URL as train.output_dir is supported for single-process runs "
                          "only (each host would mirror its own share of the checkpoints)",
                          where="train.output_dir", fix="mount the bucket on every host (e.g. "
                          "gcsfuse) and give the mounted path")
    mirror = RunMirror(url)
    pulled = mirror.pull()
    print(f"cadenza: {url} mirrored in {mirror.local} ({pulled} files downloaded)",
          file=sys.stderr)
    local = dataclasses.replace(config, train=dataclasses.replace(
        config.train, output_dir=str(mirror.local)))
    with OutputLock(mirror.local):
        try:
            summary = _fit(local, data, eval_data, task, devices, allow_changes,
                           on_save=mirror.push)
        finally:
            mirror.push()
    for key in ("output_dir", "model_dir", "adapters_dir"):
        if summary.get(key):
            summary[key] = url + summary[key][len(str(mirror.local)):]
    return summary


def _fit(config, data, eval_data, task, devices, allow_changes, on_save=None) -> dict:
    train = config.train
    mesh = make_mesh(config.mesh, devices)
    rules = config.mesh.rules()
    task = task or default_task(config)
    optimizer, schedule = task.wrap_optimizer(make_optimizer(train)), make_schedule(train)
    shardings = state_shardings(task, optimizer, mesh, rules)
    frozen = task.load_frozen(mesh, rules)
    frozen_shardings = jax.tree.map(lambda a: a.sharding, frozen)
    rows = batch_sharding(mesh, rules)
    rep = replicated(mesh)
    out_dir = pathlib.Path(train.output_dir)
    is_main = jax.process_index() == 0

    ckpts = Checkpoints(out_dir, config, keep=train.keep_checkpoints,
                        async_save=train.async_checkpoints, allow_changes=allow_changes)
    data = _build_iterator(config, "train") if data is None else data
    restored = ckpts.restore_newest_good(abstract_state(task, optimizer, shardings))
    resumed_from, skipped = restored.step, restored.skipped
    for s in skipped:
        print(f"cadenza: skipped checkpoint step {s['step']}: {s['reason']}", file=sys.stderr)
    if resumed_from is not None:
        state = restored.state
        data.set_state(restored.data_state)
    else:
        state = init_state(task, optimizer, train.seed, mesh, rules, shardings)
    if train.eval_every and eval_data is None:
        eval_data = _build_iterator(config, "test")
    eval_start = eval_data.get_state() if eval_data is not None else None

    shaping = loss_shaping_options(config)
    step_fn = make_train_step(task, optimizer, schedule, microbatches=train.microbatches,
                              z_loss=train.z_loss, rules=rules, state_shardings=shardings,
                              frozen_shardings=frozen_shardings, batch_sharding=rows,
                              metric_sharding=rep, **shaping)
    eval_fn = make_eval_step(task, rules=rules, param_shardings=shardings.params,
                             frozen_shardings=frozen_shardings, batch_sharding=rows,
                             metric_sharding=rep, num_sources=shaping["num_sources"])

    trainable = None if task.trainable_params == task.total_params else task.trainable_params
    flops = flops_per_token(config.model, train.seq_len, trainable)
    peak = peak_flops_per_device(devices[0], train.peak_tflops_per_device)
    tokens_per_step = train.batch_size * train.seq_len

    show_bar = train.progress_bar and is_main and sys.stderr.isatty()  # no \r in log files
    writer = _metrics_writer(config, out_dir, echo=not show_bar) if is_main else None
    start = int(state.step)
    if writer is not None:
        writer.resume_at(start)

    def evaluate(params):
        """Mean held-out loss over up to ``eval_steps`` batches (fewer if the split ends),
        and the means of the task's extra metrics (named ``eval_<metric>``)."""
        eval_data.set_state(eval_start)
        ce = count = 0.0
        extra: dict = {}
        for _, batch in zip(range(train.eval_steps), eval_data):
            c, n, e = eval_fn(params, frozen, _global_batch(batch, rows, config))
            ce, count = ce + float(c), count + float(n)
            extra = {k: extra.get(k, 0.0) + float(v) for k, v in e.items()}
        return ce / max(count, 1.0), {f"eval_{k}": v / max(count, 1.0) for k, v in extra.items()}

    summary = {"step": start, "loss": None, "eval_loss": None, "resumed_from": resumed_from,
               "skipped_checkpoints": skipped, "skipped_records": None, "stopped": "completed",
               "tokens_per_s": None, "step_time_s": None, "mfu": None, "compile_s": None,
               "output_dir": str(out_dir), "model_dir": None, "adapters_dir": None}
    pending: list[tuple[int, dict]] = []
    bar = tqdm(total=train.steps, initial=start, unit="step", desc=f"train {config.name}",
               disable=not show_bar)
    t_start, t_mark, steps_since = time.perf_counter(), None, 0

    def flush(step: int) -> dict:
        """Fetch pending metrics, stop on the first non-finite step, return the last."""
        fetched = [(s, jax.device_get(m)) for s, m in pending]
        pending.clear()
        for s, m in fetched:
            if not m["finite"]:
                raise NonFiniteError(
                    f"non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}) at step "
                    f"{s}; no checkpoint was written for it or later steps",
                    where=f"step {s}", fix="lower train.learning_rate, set train.grad_clip_norm, "
                    "or check the data batches of that step")
        return fetched[-1][1] if fetched else {}

    try:
        with _StopSignals() as stop, jax.set_mesh(mesh):
            step = start
            while step < train.steps:
                try:
                    batch = next(data)
                except StopIteration:
                    raise CadenzaError(f"the data iterator ran out after {step} steps",
                                       where="data", fix="use a repeating iterator or fewer "
                                       "train.steps") from None
                state, metrics = step_fn(state, frozen, _global_batch(batch, rows, config))
                step += 1
                pending.append((step, metrics))
                bar.update(1)
                if t_mark is None:  # the first step of this process includes compilation
                    jax.block_until_ready(metrics)
                    summary["compile_s"] = time.perf_counter() - t_start
                    t_mark, steps_since = time.perf_counter(), 0
                    _restart_rate(bar, step)  # the bar's ETA leaves compilation out
                else:
                    steps_since += 1
                final = step == train.steps
                save_due = (train.checkpoint_every and step % train.checkpoint_every == 0)
                if step % train.log_every == 0 or final or save_due or stop.received:
                    m = flush(step)
                    record = {"loss": float(m["loss"]), "lr": float(m["lr"]),
                              "grad_norm": float(m["grad_norm"]), "tokens": float(m["tokens"])}
                    if train.z_loss or "router_z_loss" in m:
                        record["objective"] = float(m["objective"])
                    record.update({k: float(v) for k, v in m.items() if k not in _STEP_METRICS})
                    if steps_since:
                        dt = (time.perf_counter() - t_mark) / steps_since
                        tps = tokens_per_step / dt
                        mfu = tps * flops / (peak * len(devices)) if peak else None
                        record.update(step_time_s=dt, tokens_per_s=tps, mfu=mfu)
                        summary.update(step_time_s=dt, tokens_per_s=tps, mfu=mfu)
                        t_mark, steps_since = time.perf_counter(), 0
                    if train.eval_every and (step % train.eval_every == 0 or final):
                        record["eval_loss"], eval_extra = evaluate(state.params)
                        summary["eval_loss"] = record["eval_loss"]
                        record.update(eval_extra)
                    summary.update(step=step, loss=record["loss"])
                    if writer is not None:
                        writer.write(step, record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                if save_due or final or stop.received:
                    ckpts.save(step, state, data.get_state())
                    if on_save is not None:
                        on_save()
                if stop.received:
                    summary["stopped"] = stop.received
                    break
            summary["step"] = step
            summary["skipped_records"] = skipped_records(data)
            if step == start and start:  # resumed at the end: report what the run logged
                summary.update(_last_logged(out_dir))
            ckpts.wait()
        if summary["stopped"] == "completed":
            summary.update(_export(out_dir, config, task, state, frozen, data,
                                   fresh=step > start))
    finally:
        bar.close()
        ckpts.close()
        if writer is not None:
            writer.close()
    return summary


def _metrics_writer(config: ExperimentConfig, out_dir: pathlib.Path, echo: bool):
    """JSONL, the text log (echoed to stdout when ``echo``), TensorBoard and W&B as
    ``train.tensorboard`` / ``train.wandb_project`` ask."""
    from cadenza.config import to_yaml
    from cadenza.train.metrics import (
        TensorBoardMetrics,
        TextLogMetrics,
        WandbMetrics,
        flat_hparams,
    )

    train, hparams = config.train, flat_hparams(config)
    backends = [TextLogMetrics(out_dir, train.steps, name=f"[{config.name}]", echo=echo)]
    if train.tensorboard:
        backends.append(TensorBoardMetrics(out_dir, hparams, to_yaml(config)))
    if train.wandb_project:
        backends.append(WandbMetrics(out_dir, train.wandb_project, config.name, hparams))
    return MetricsWriter(out_dir, backends)


def _restart_rate(bar, step: int) -> None:
    """Restart ``bar``'s clock at ``step`` so its rate and ETA count only later steps."""
    bar.reset(total=bar.total)
    bar.initial = bar.n = bar.last_print_n = step
    bar.refresh()
def loss_shaping_options(config: ExperimentConfig) -> dict:
    """The loss-shaping keyword arguments of :func:`make_train_step` from ``config.data``:
    Masked Thought's probability and mask id (default: the model's pad id) and the
    number of sources the task-balanced loss averages over."""
    data = config.data
    mask_id = data.response_mask_id
    return {"response_mask_prob": data.response_mask_prob,
            "response_mask_id": (mask_id if mask_id is not None
                                 else config.model.pad_token_id or 0),
            "num_sources": len(data.sources())}


def default_task(config: ExperimentConfig) -> TrainTask:
    """Full training, or the PEFT task when ``peft.method`` is set (base: ``train.init_from``),
    or the Medusa / SpecDec++ head task, the DPO / ORPO preference task or draft
    distillation ``train.task`` names."""
    alpha = config.data.neftune_alpha
    if config.train.task in ("dpo", "orpo") or config.data.is_preference:
        from cadenza.train.preference_task import preference_task

        return preference_task(config)
    if config.train.task == "distill":
        from cadenza.train.distill_task import distill_task

        return distill_task(config)
    if config.train.task != "lm":
        from cadenza.train.head_fit import head_task

        return head_task(config)
    if config.peft.method in ("partial", "lisa", "hft"):
        from cadenza.train.peft.selective import selective_task

        return selective_task(config, neftune_alpha=alpha)
    if config.peft.method != "none":
        from cadenza.train.peft.task import peft_task

        return peft_task(config, neftune_alpha=alpha)
    return full_model_task(config.model, neftune_alpha=alpha, init_from=config.train.init_from)


def _export(out_dir: pathlib.Path, config, task: TrainTask, state, frozen, data,
            fresh: bool) -> dict:
    """Write ``adapters/`` (PEFT, head tasks) and ``model/`` (when the trained state folds
    into model params), each under a temporary name renamed into place when complete
    (:func:`cadenza.outputs.atomic_dir`), replacing those of an earlier, shorter run. With
    ``fresh=False`` (nothing trained since the run resumed) complete ones are kept and
    missing or incomplete ones (an interrupted export) are written. The tokenizer comes
    from the data iterator's ``tokenizer`` (its ``directory``), if any. Returns
    ``model_dir`` and ``adapters_dir`` (None where absent)."""
    from cadenza.models import save_model

    model_dir, adapters_dir = out_dir / "model", out_dir / "adapters"
    params = task.export(state.params, frozen)
    wanted = ([adapters_dir] if task.save_adapters is not None else []) + (
        [model_dir] if params is not None else [])
    for d in wanted:
        if fresh or not is_complete(d):
            with atomic_dir(d, replace=True) as tmp:
                if d == adapters_dir:
                    task.save_adapters(tmp, state.params)
                else:
                    save_model(tmp, config, params, tokenizer_dir=_tokenizer_dir(data))
    return {"model_dir": str(model_dir) if model_dir in wanted else None,
            "adapters_dir": str(adapters_dir) if adapters_dir in wanted else None}


def skipped_records(data) -> dict | None:
    """Bad records left out of the training data, by reason: ``build`` (when the dataset
    was prepared) and ``formatting`` (by this run's iterator); None for iterators that do
    not count them (e.g. synthetic batches)."""
    if not hasattr(data, "stats"):
        return None
    build: dict = {}
    for report in getattr(data, "build_reports", None) or []:
        for reason, n in (report or {}).get("skipped", {}).items():
            build[reason] = build.get(reason, 0) + n
    formatting = data.stats().get("skipped", {})
    return {"build": build, "formatting": formatting,
            "total": sum(build.values()) + sum(formatting.values())}


def _last_logged(out_dir: pathlib.Path) -> dict:
    """``loss`` and ``eval_loss`` of the last record in ``metrics.jsonl`` (those absent
    from it are left out), for a run that resumes with no step left to train."""
    path = out_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    last = json.loads(lines[-1]) if lines else {}
    return {k: last[k] for k in ("loss", "eval_loss") if k in last}


def _tokenizer_dir(data):
    tokenizer = getattr(data, "tokenizer", None)
    return None if tokenizer is None else tokenizer.directory
