"""Reading experiment YAML, presets and ``section.field=value`` overrides into
an :class:`~cadenza.config.ExperimentConfig`, with errors a user can act on.

Merge order (later wins): dataclass defaults, the model preset
(``configs/models/<preset>.yaml``), the experiment file, the overrides.
"""

import dataclasses
import logging
import pathlib
import types
import typing

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from cadenza.config import CONFIG_ROOT, ExperimentConfig, preset_names, suggest
from cadenza.errors import ConfigError
from cadenza.inputs import read_text


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, except that a key repeated in one mapping is an error (plain
    YAML loading keeps the last one and silently drops the first)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise ConfigError(
                    f"key {key!r} appears twice in one mapping (lines {first} and "
                    f"{key_node.start_mark.line + 1}); the second would silently replace the "
                    "first", where=f"{key_node.start_mark.name}:{key_node.start_mark.line + 1}",
                    fix="merge the two into one entry")
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: pathlib.Path, what: str) -> dict:
    try:
        loader = _UniqueKeyLoader(read_text(path, what))
        loader.name = str(path)  # error positions name the file
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {e}", where=str(path),
                          fix="correct the YAML syntax at the position shown") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping of sections, got {type(data).__name__}",
                          where=str(path), fix="write 'section:' keys at the top level")
    return data


def _experiment_path(path) -> pathlib.Path:
    p = pathlib.Path(path)
    if p.is_file():
        return p
    shipped = CONFIG_ROOT / "experiments" / f"{p.stem if p.suffix == '.yaml' else p}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(q.stem for q in (CONFIG_ROOT / "experiments").glob("*.yaml"))
    raise ConfigError(f"experiment config {str(path)!r} not found", where="config path",
                      fix=f"give an existing YAML file or a shipped experiment: {', '.join(names)}."
                          f"{suggest(p.stem, names)}")


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for o in overrides:
        key = o.split("=", 1)[0]
        if "=" not in o or not key or key.startswith(".") or key.endswith("."):
            raise ConfigError(f"override {o!r} is not of the form section.field=value",
                              where="command-line overrides",
                              fix="write e.g. train.steps=100 or model.preset=tiny")
    try:
        return OmegaConf.from_dotlist(overrides)
    except Exception as e:  # OmegaConf's grammar errors have several types.
        raise ConfigError(f"cannot parse overrides {overrides}: {e}",
                          where="command-line overrides",
                          fix="quote values with spaces, e.g. decode.stop='[\"\\n\\n\"]'") from None


def _field_type_at(path: list[str]):
    """The dataclass (or container type) found by following ``path`` from ExperimentConfig."""
    t = ExperimentConfig
    for part in path:
        if dataclasses.is_dataclass(t):
            hints = typing.get_type_hints(t)
            if part not in hints:
                return None
            t = hints[part]
        else:
            return None
    return t


def _translate(e: Exception, source: str) -> ConfigError:
    key = getattr(e, "full_key", "") or ""
    msg = str(e).split("\n")[0]
    if isinstance(e, oc_errors.ConfigKeyError):
        parent, _, leaf = key.rpartition(".")
        t = _field_type_at(parent.split(".") if parent else [])
        fields = [f.name for f in dataclasses.fields(t)] if dataclasses.is_dataclass(t) else []
        where = parent or "top level"
        hint = suggest(leaf, fields)
        return ConfigError(f"unknown key {leaf!r} in {where} (from {source}).{hint}",
                           where=key, fix=f"valid keys in {where}: {', '.join(fields)}")
    if isinstance(e, oc_errors.ValidationError):
        t = _field_type_at(key.split(".")) if key else None
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if typing.get_origin(t) in (typing.Union, types.UnionType) and len(args) == 1:
            t = args[0]  # Optional[X]: X or null
        expected = getattr(t, "__name__", None) or str(t)
        return ConfigError(f"{msg} (from {source})", where=key or "config",
                           fix=f"give a value of type {expected}")
    return ConfigError(f"{msg} (from {source})", where=key or "config",
                       fix="check the value against the field's documented type")


def _schema() -> DictConfig:
    from cadenza.models.config import SWITCH_DEFAULTS

    schema = OmegaConf.structured(ExperimentConfig)
    _make_writable(schema)
    for name in SWITCH_DEFAULTS:  # unset: the (possibly overridden) family decides
        schema.model[name] = None
    return schema


def _make_writable(node) -> None:
    # Frozen dataclasses mark every OmegaConf node read-only, which would
    # forbid merging; the result is frozen again when turned into dataclasses.
    OmegaConf.set_readonly(node, None)
    if isinstance(node, DictConfig):
        for k in node.keys():
            child = node._get_node(k)
            OmegaConf.set_readonly(child, None)
            if isinstance(child, (DictConfig, ListConfig)):
                _make_writable(child)


def build_experiment(path, overrides: list[str], preset: str | None) -> ExperimentConfig:
    layers: list[tuple[str, dict | DictConfig]] = []
    file_data: dict = {}
    if path is not None:
        p = _experiment_path(path)
        file_data = _read_yaml(p, "experiment config")
        if isinstance(file_data.get("decode"), dict):
            from cadenza.decode.config import upgrade_legacy_decode

            file_data["decode"], moved = upgrade_legacy_decode(file_data["decode"])
            if moved:
                logging.getLogger("cadenza").info(
                    "%s: older decode fields %s read into their per-method sections", p,
                    ", ".join(moved))
        layers.append((str(p), file_data))
    cli = _parse_overrides(overrides)
    layers.append(("command-line overrides", cli))

    chosen = OmegaConf.select(cli, "model.preset", default=None)
    if chosen is None and isinstance(file_data.get("model"), dict):
        chosen = file_data["model"].get("preset")
    chosen = chosen or preset
    if chosen is not None:
        names = preset_names()
        if chosen not in names:
            raise ConfigError(f"unknown model preset {chosen!r}.{suggest(str(chosen), names)}",
                              where="model.preset", fix=f"use one of: {', '.join(names)}")
        model = _read_yaml(CONFIG_ROOT / "models" / f"{chosen}.yaml", "model preset")
        layers.insert(0, (f"preset {chosen}", {"model": {**model, "preset": chosen}}))

    merged = _schema()
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except oc_errors.OmegaConfBaseException as e:
            raise _translate(e, source) from None
    try:
        return OmegaConf.to_object(merged)
    except oc_errors.OmegaConfBaseException as e:
        raise _translate(e, "the merged config") from None
