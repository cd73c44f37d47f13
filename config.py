"""Typed experiment configs and the loader that builds them from YAML.

An experiment is one frozen :class:`ExperimentConfig` with a section per
area: ``model``, ``mesh``, ``train``, ``data``, ``peft`` and ``decode``.
Experiment YAML files name a model preset (``model.preset: tiny``, a file in
``configs/models/``) and override any field; ``section.field=value``
overrides from the command line apply last. Parsing, merging and type
checking are done by OmegaConf structured configs; cadenza adds did-you-mean
suggestions and range checks (in each dataclass's ``__post_init__``).
"""

import dataclasses
import difflib
import pathlib
from typing import Optional

from cadenza.errors import ConfigError
from cadenza.models.config import ModelConfig
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
                f"batch_size={self.batch_size} is not divisible by microbatches={self.microbatches}",
                where="train.microbatches", fix="choose microbatches dividing batch_size")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training examples come from and how they are shaped."""

    format: str = "stdlib_code"
    path: Optional[str] = None
    data_dir: Optional[str] = None
    packing: bool = True
    seed: int = 0

    def __post_init__(self):
        check_choice("data", "format", self.format,
                     ("stdlib_code", "stdlib_instruct", "alpaca", "sharegpt", "messages", "text",
                      "tfds"))


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Parameter-efficient fine-tuning: the method and its hyperparameters."""

    method: str = "none"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = r".*attn\.(q|k|v|o)_proj"

    def __post_init__(self):
        s = "peft"
        check_choice(s, "method", self.method,
                     ("none", "lora", "lora_plus", "dora", "qlora", "ia3", "prefix", "prompt"))
        check_range(s, "rank", self.rank, low=1)
        check_range(s, "alpha", self.alpha, low=0.0, low_inclusive=False)
        check_range(s, "dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Decoding method and sampling settings."""

    method: str = "greedy"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        s = "decode"
        check_choice(s, "method", self.method, ("greedy", "sample"))
        check_range(s, "max_new_tokens", self.max_new_tokens, low=1)
        check_range(s, "temperature", self.temperature, low=0.0, low_inclusive=False)
        check_range(s, "top_k", self.top_k, low=0)
        check_range(s, "top_p", self.top_p, low=0.0, high=1.0, low_inclusive=False)
        check_range(s, "min_p", self.min_p, low=0.0, high=1.0, high_inclusive=False)
        check_range(s, "repetition_penalty", self.repetition_penalty, low=0.0,
                    low_inclusive=False)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: one section per area."""

    name: str = "experiment"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)


CONFIG_ROOT = pathlib.Path(__file__).resolve().parent / "configs"


def preset_names() -> list[str]:
    """Names of the shipped model presets (files in ``configs/models``)."""
    return sorted(p.stem for p in (CONFIG_ROOT / "models").glob("*.yaml"))


def load_config(path=None, overrides=(), *, preset: str | None = None) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from an experiment YAML and overrides.

    Args:
      path: an experiment YAML file, or the name of a shipped experiment
        (``configs/experiments/NAME.yaml``), or None for all defaults.
      overrides: ``section.field=value`` strings applied last (values are YAML).
      preset: a model preset name used when neither file nor overrides set one.

    Raises:
      ConfigError: unknown keys (with a did-you-mean), wrong types, values out
        of range, missing files or presets.
    """
    from cadenza.config_loading import build_experiment

    return build_experiment(path, list(overrides), preset)


def to_yaml(config) -> str:
    """The config as YAML, every field shown (what ``config show`` prints and runs save)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(config))


def suggest(name: str, choices) -> str:
    """A ' Did you mean ...?' hint for ``name`` among ``choices``, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
