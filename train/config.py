"""Config sections of the training core: the device mesh and the optimisation run."""

import dataclasses

from cadenza.errors import ConfigError
from cadenza.validation import check_choice, check_range

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

DEFAULT_LOGICAL_AXIS_RULES = {
    "batch": ["data", "fsdp"],
    "length": ["sequence"],
    "embed": ["fsdp"],
    "vocab": ["tensor"],
    "heads": ["tensor"],
    "kv_heads": ["tensor"],
    "head_dim": [],
    "mlp": ["tensor"],
    "layers": [],
    "cache_length": [],
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape and logical-to-mesh axis rules.

    Axis sizes multiply to the device count; one size may be -1 ("the rest").
    ``logical_axis_rules`` maps each logical axis name used by the model to
    the mesh axes it is sharded over (an empty list means replicated).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    logical_axis_rules: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_LOGICAL_AXIS_RULES.items()})

    def __post_init__(self):
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        for axis, size in sizes.items():
            if size == 0 or size < -1:
                raise ConfigError(f"mesh axis size {size} is invalid", where=f"mesh.{axis}",
                                  fix="use a positive size, or -1 for 'the rest of the devices'")
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError("more than one mesh axis is -1", where="mesh",
                              fix="give at most one axis the size -1")
        for logical, axes in self.logical_axis_rules.items():
            for axis in axes:
                if axis not in MESH_AXES:
                    raise ConfigError(f"unknown mesh axis {axis!r}",
                                      where=f"mesh.logical_axis_rules.{logical}",
                                      fix=f"use mesh axes from {MESH_AXES}")

    def rules(self) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
        """The rules in Flax's ``logical_axis_rules`` form."""
        return tuple((k, tuple(v) if v else None) for k, v in self.logical_axis_rules.items())



@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run settings of ``cadenza train``."""

    output_dir: str = "runs/default"
    seed: int = 0
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256
    microbatches: int = 1
    optimizer: str = "adamw"
    learning_rate: float = 3e-4
    schedule: str = "cosine"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    z_loss: float = 0.0
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2

    def __post_init__(self):
        s = "train"
        for name in ("steps", "batch_size", "seq_len", "microbatches", "log_every",
                     "keep_checkpoints"):
            check_range(s, name, getattr(self, name), low=1)
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "weight_decay",
                     "grad_clip_norm", "z_loss"):
            check_range(s, name, getattr(self, name), low=0)
        check_range(s, "learning_rate", self.learning_rate, low=0.0, low_inclusive=False)
        check_choice(s, "optimizer", self.optimizer, ("adamw", "adafactor", "lion", "sgd"))
        check_choice(s, "schedule", self.schedule, ("cosine", "linear", "constant"))
        if self.batch_size % self.microbatches:
            raise ConfigError(
                f"batch_size={self.batch_size} is not divisible by "
                f"microbatches={self.microbatches}",
                where="train.microbatches", fix="choose microbatches dividing batch_size")
