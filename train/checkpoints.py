"""Train checkpoints: orbax CheckpointManager (async, keep-last-N, atomic) plus the run's
resolved config.

Layout under ``<output_dir>/checkpoints``::

    config.yaml     the resolved ExperimentConfig the checkpoints were written under
    changes.jsonl   one line per resume that changed training hyperparameters (allowed
                    explicitly): the step, the time and the changed fields
    <step>/state    the TrainState (params, optimizer state, step, rng), sharded arrays
    <step>/data     the data iterator's ``get_state()`` (JSON)

Orbax writes each step into a temporary directory and renames it when complete,
so a save interrupted at any moment (even SIGKILL) leaves the previous complete
step as the latest one. Restores take an abstract target with shardings, so a
checkpoint saved on one mesh restores onto any other mesh shape or device count.
A step that does not restore (corrupt or truncated files, a wrong shape, a missing
item) is skipped for the next older one, and the reason is reported.
"""

import dataclasses
import datetime
import json
import pathlib
import shutil
from typing import NamedTuple

import jax
import orbax.checkpoint as ocp

from cadenza.config import ExperimentConfig, load_config, to_yaml
from cadenza.errors import CadenzaError, one_line
from cadenza.outputs import atomic_file, disk_errors

# Model fields that may change between a checkpoint and its resume (compute, not shape).
MODEL_FREE_FIELDS = ("preset", "dtype", "remat_policy", "attention_impl")
_PEFT_FREE_FIELDS = ("dropout",)
# Train fields that do not change what the updates compute (logging, saving, output).
_TRAIN_FREE_FIELDS = ("output_dir", "log_every", "eval_every", "eval_steps",
                      "checkpoint_every", "keep_checkpoints", "async_checkpoints",
                      "tensorboard", "progress_bar", "peak_tflops_per_device", "microbatches")


def config_differences(section: str, old, new, free=(),
                       names=("checkpoint", "this run")) -> list[str]:
    """``section.field: <names[0]> has A, <names[1]> has B`` for each dataclass field of
    ``old`` that differs in ``new`` (fields named in ``free`` excepted)."""
    out = []
    for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if f.name not in free and a != b:
            out.append(f"{section}.{f.name}: {names[0]} has {a!r}, {names[1]} has {b!r}")
    return out


# Quantisation settings that mean nothing while both models are float (weight_quant
# "none"): directories saved before the default targets changed record other targets.
_FLOAT_FREE_FIELDS = ("weight_quant_targets", "weight_quant_group")


def model_differences(saved, model, names=("checkpoint", "this run")) -> list[str]:
    """The fields of two ModelConfigs that make them different models, one
    "model.field: <names[0]> has A, <names[1]> has B" line each: not the compute-only
    ``preset``/``dtype``/``remat_policy``/``attention_impl``, not the quantisation
    targets and group of two float models, and ``head_dim`` compared as resolved (0 means
    hidden_size // num_heads)."""
    free = MODEL_FREE_FIELDS
    if saved.weight_quant == "none" and model.weight_quant == "none":
        free += _FLOAT_FREE_FIELDS
    saved, model = (dataclasses.replace(c, head_dim=c.resolved_head_dim)
                    for c in (saved, model))
    return config_differences("model", saved, model, free, names)


def changed_hyperparameters(saved: ExperimentConfig, config: ExperimentConfig) -> list[str]:
    """The training hyperparameters (``train.*`` fields that change the updates: learning
    rate, schedule, steps, batch size, seed, optimizer, ...) that differ, one
    "train.field: checkpoint has A, this run has B" line each."""
    return config_differences("train", saved.train, config.train, _TRAIN_FREE_FIELDS)


def check_compatible(saved: ExperimentConfig, config: ExperimentConfig, where: str) -> None:
    """Fail unless ``config`` can resume from a checkpoint written under ``saved``: same
    model shape, same data section (dataset and its order), same PEFT layout. Mesh and
    compute settings may change; training hyperparameters are checked separately
    (:func:`changed_hyperparameters`)."""
    diffs = (model_differences(saved.model, config.model)
             + config_differences("data", saved.data, config.data)
             + config_differences("peft", saved.peft, config.peft, _PEFT_FREE_FIELDS))
    if diffs:
        raise CadenzaError("cannot resume: the checkpoint was written for a different "
                           "model or dataset (" + "; ".join(diffs) + ")", where=where,
                           fix="use a new train.output_dir for the new experiment, or restore "
                               "the checkpoint's values")


class Restored(NamedTuple):
    """What :meth:`Checkpoints.restore_newest_good` found."""

    step: int | None
    state: object
    data_state: object
    skipped: list[dict]


class Checkpoints:
    """The checkpoint directory of one run (see the module docstring).

    ``save`` returns once the arrays are copied off the devices (async mode) so the
    next step may reuse (donate) their buffers; writing continues in the background.
    """

    def __init__(self, output_dir, config: ExperimentConfig, *, keep: int, async_save: bool,
                 allow_changes: bool = False):
        """Open (or create) the checkpoint directory of ``output_dir`` for ``config``.

        When it holds a checkpoint, ``config`` must be compatible
        (:func:`check_compatible`) and have the same training hyperparameters, unless
        ``allow_changes``: then the changes are appended to ``changes.jsonl`` and
        ``config.yaml`` is rewritten. A ``config.yaml`` without any checkpoint (a run
        that failed before its first save) is replaced by ``config``'s."""
        self.directory = pathlib.Path(output_dir).absolute() / "checkpoints"
        self.config = config
        config_file = self.directory / "config.yaml"
        has_steps = self.directory.is_dir() and any(
            p.name.isdigit() for p in self.directory.iterdir())
        write = not (has_steps and config_file.is_file())
        if not write:
            saved = load_config(config_file)
            check_compatible(saved, config, str(config_file))
            changes = changed_hyperparameters(saved, config)
            if changes and not allow_changes:
                raise CadenzaError("cannot resume: training hyperparameters differ from the "
                                   "checkpoint's (" + "; ".join(changes) + ")",
                                   where=str(config_file),
                                   fix="restore the checkpoint's values, use a new "
                                       "train.output_dir, or allow the change explicitly "
                                       "(cadenza train --allow-changes; fit(allow_changes="
                                       "True)), which is recorded in checkpoints/changes.jsonl")
            if changes and jax.process_index() == 0:
                record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                          "resumed_from_step": max(int(p.name) for p in self.directory.iterdir()
                                                   if p.name.isdigit()),
                          "changes": changes}
                with open(self.directory / "changes.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            write = bool(changes)
        if write and jax.process_index() == 0:
            with disk_errors(self.directory):
                self.directory.mkdir(parents=True, exist_ok=True)
                with atomic_file(config_file, overwrite=True) as tmp:
                    tmp.write_text(to_yaml(config))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data"))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, data_state) -> None:
        """Save ``state`` (a TrainState of jax.Arrays) and ``data_state`` (JSON) at ``step``."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, step: int, target):
        """``(state, data_state)`` of ``step``; ``target`` is the abstract TrainState whose
        leaves are ``jax.ShapeDtypeStruct`` s with the shardings to restore into."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def restore_newest_good(self, target) -> "Restored":
        """Restore the newest checkpoint that restores cleanly into ``target`` (see
        :meth:`restore`) and whose state holds its own step number; newer ones that fail
        are skipped and listed with the reason. ``Restored.step`` is None when there is
        no checkpoint at all; raises :class:`CadenzaError` when there are some but none
        restores. The skipped steps are renamed to ``skipped-<step>`` (kept for inspection;
        the run writes those steps again)."""
        skipped = []
        for step in reversed(self.all_steps()):
            try:
                state, data_state = self.restore(step, target)
                if int(state.step) != step:
                    raise ValueError(f"the saved state is at step {int(state.step)}")
            except Exception as e:  # any orbax/tensorstore failure: corrupt, truncated, shape
                skipped.append({"step": step, "reason": one_line(e)})
                continue
            self._set_aside(skipped)
            return Restored(step, state, data_state, skipped)
        if skipped:
            raise CadenzaError("cannot resume: no checkpoint restores (" + "; ".join(
                f"step {s['step']}: {s['reason']}" for s in skipped) + ")",
                where=str(self.directory),
                fix="delete the broken checkpoints/<step> folders (or the whole checkpoints/ "
                    "folder to start over), or use a new train.output_dir")
        return Restored(None, None, None, [])

    def _set_aside(self, skipped: list[dict]) -> None:
        if not skipped:
            return
        if jax.process_index() == 0:
            for s in skipped:
                src, dst = self.directory / str(s["step"]), self.directory / f"skipped-{s['step']}"
                if dst.exists():
                    shutil.rmtree(dst)
                src.rename(dst)
                s["moved_to"] = str(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("cadenza:skip-checkpoints")
        self._manager.reload()

    def wait(self) -> None:
        """Block until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
