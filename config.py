"""Typed experiment configs and the loader that builds them from YAML.

An experiment is one frozen :class:`ExperimentConfig` with a section per
area: ``model``, ``mesh``, ``train``, ``data``, ``peft``, ``decode`` and ``lud``.
Experiment YAML files name a model preset (``model.preset: tiny``, a file in
``configs/models/``) and override any field; ``section.field=value``
overrides from the command line apply last. Parsing, merging and type
checking are done by OmegaConf structured configs; cadenza adds did-you-mean
suggestions and range checks (in each dataclass's ``__post_init__``).
"""

import dataclasses
import difflib
import pathlib

from cadenza.decode.config import DecodeConfig
from cadenza.decode.lud_config import LudConfig
from cadenza.models.config import ModelConfig
from cadenza.train.config import MESH_AXES, MeshConfig, TrainConfig  # noqa: F401 (re-export)
from cadenza.train.data_config import DataConfig
from cadenza.train.peft_config import PeftConfig


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
    lud: LudConfig = dataclasses.field(default_factory=LudConfig)


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
