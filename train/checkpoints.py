"""Train checkpoints: orbax CheckpointManager (async, keep-last-N, atomic) plus the run's
resolved config.

Layout under ``<output_dir>/checkpoints``::

    config.yaml     the resolved ExperimentConfig of the run that created the directory
    <step>/state    the TrainState (params, optimizer state, step, rng), sharded arrays
    <step>/data     the data iterator's ``get_state()`` (JSON)

Orbax writes each step into a temporary directory and renames it when complete,
so a save interrupted at any moment (even SIGKILL) leaves the previous complete
step as the latest one. Restores take an abstract target with shardings, so a
checkpoint saved on one mesh restores onto any other mesh shape or device count.
"""

import dataclasses
import pathlib

import jax
import orbax.checkpoint as ocp

from cadenza.config import ExperimentConfig, load_config, to_yaml
from cadenza.errors import CadenzaError

# Model fields that may change between a checkpoint and its resume (compute, not shape).
MODEL_FREE_FIELDS = ("preset", "dtype", "remat_policy", "attention_impl")
_PEFT_FREE_FIELDS = ("dropout",)


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


def check_compatible(saved: ExperimentConfig, config: ExperimentConfig, where: str) -> None:
    """Fail unless ``config`` can resume from a checkpoint written under ``saved``: same
    model shape, same data section (dataset and its order), same PEFT layout. Mesh,
    optimizer and run-length settings may change."""
    diffs = (config_differences("model", saved.model, config.model, MODEL_FREE_FIELDS)
             + config_differences("data", saved.data, config.data)
             + config_differences("peft", saved.peft, config.peft, _PEFT_FREE_FIELDS))
    if diffs:
        raise CadenzaError("cannot resume: the checkpoint was written for a different "
                           "model or dataset (" + "; ".join(diffs) + ")", where=where,
                           fix="use a new train.output_dir for the new experiment, or restore "
                               "the checkpoint's values")


class Checkpoints:
    """The checkpoint directory of one run (see the module docstring).

    ``save`` returns once the arrays are copied off the devices (async mode) so the
    next step may reuse (donate) their buffers; writing continues in the background.
    """

    def __init__(self, output_dir, config: ExperimentConfig, *, keep: int, async_save: bool):
        self.directory = pathlib.Path(output_dir).absolute() / "checkpoints"
        self.config = config
        config_file = self.directory / "config.yaml"
        if config_file.is_file():
            check_compatible(load_config(config_file), config, str(config_file))
        elif jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            config_file.write_text(to_yaml(config))
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

    def wait(self) -> None:
        """Block until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
