"""Import Hugging Face checkpoints (config.json + safetensors) into cadenza.

- :func:`open_hf_checkpoint`: find the directory, read config.json and every
  safetensors header (single file or sharded with
  ``model.safetensors.index.json``), refuse pickle and remote code.
- :func:`load_hf`: strict check of every tensor name, shape and dtype against
  the config (all problems reported in one error, before anything is
  compiled), then the params, each tensor placed directly into its shards.
- :func:`import_hf`: the above, written as a cadenza model directory with the
  tokenizer files copied.
"""

import collections
import dataclasses
import json
import logging
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import safetensors

from cadenza.errors import CadenzaError
from cadenza.models import hf_quant
from cadenza.models.config import ModelConfig
from cadenza.models.hf_config import model_config_from_hf
from cadenza.models.hf_weights import (
    HEADS_OUT,
    get_path,
    hf_shape,
    read_block,
    read_stacked,
    set_path,
    weight_specs,
)

log = logging.getLogger("cadenza.hf")

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Tokenizer and generation files copied into a model directory's tokenizer/ folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
# Buffers some exports include that cadenza recomputes from the config.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# safetensors dtype tags of the float dtypes cadenza reads (others: quantized or integer).
FLOAT_TAGS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_MAX_LISTED = 12
# The safetensors library's header errors, in words (its message is kept after them).
_HEADER_ERRORS = {
    "header too small": "no safetensors header, the file is too short to hold one",
    "invalid header length": "the file is truncated, its header is longer than the file",
    "incomplete metadata, file not fully covered":
        "the file is truncated (or has extra bytes), its size does not match the tensors "
        "its header lists",
    "invalid shape, data type, or offset for tensor":
        "a tensor's byte range does not match its shape and dtype",
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One HF tensor: the file holding it, its safetensors dtype tag and its shape."""

    file: pathlib.Path
    dtype: str
    shape: tuple[int, ...]


@dataclasses.dataclass
class HFCheckpoint:
    """An opened HF checkpoint: its directory, config.json, tensor index and remarks.

    ``files`` holds one open ``safetensors.safe_open`` handle (numpy framework,
    memory-mapped) per weight file; nothing but the headers has been read. ``quant``:
    the accepted quantisation of a quantized checkpoint (see :mod:`.hf_quant`), else None.
    """

    directory: pathlib.Path
    hf_config: dict
    tensors: dict[str, TensorInfo]
    files: dict[pathlib.Path, safetensors.safe_open]
    notes: list[str]
    quant: hf_quant.HFQuant | None = None

    def quantized(self, name: str) -> bool:
        """Whether the HF weight ``name`` (``...weight``) is stored quantized."""
        return self.quant is not None and hf_quant.is_quantized(name, self.tensors)

    def tensor(self, name: str):
        """HF tensor ``name`` as a lazy safetensors slice: ``[slices]`` reads just that block."""
        return self.files[self.tensors[name].file].get_slice(name)


def resolve_hf_dir(path) -> pathlib.Path:
    """The HF model directory ``path`` names, or one clear error saying which one to pass."""
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise CadenzaError("no such directory", where=str(p),
                           fix="pass the folder holding config.json and *.safetensors")
    if p.is_file():
        raise CadenzaError("expected a directory, got a file", where=str(p),
                           fix=f"pass the directory that holds it: {p.parent}")
    if (p / "config.json").is_file():
        return p
    found = sorted({c.parent for pattern in ("*/config.json", "*/*/config.json",
                                             "*/*/*/config.json") for c in p.glob(pattern)})
    if len(found) == 1:
        raise CadenzaError("no config.json in this directory (wrong directory level)",
                           where=str(p), fix=f"pass the model directory below it: {found[0]}")
    if found:
        listed = ", ".join(str(f) for f in found[:5])
        raise CadenzaError(f"no config.json here, but {len(found)} model directories below it",
                           where=str(p), fix=f"pass one of: {listed}")
    if p.parent != p and (p.parent / "config.json").is_file():
        raise CadenzaError("no config.json in this directory (wrong directory level)",
                           where=str(p), fix=f"pass the model directory one level up: {p.parent}")
    raise CadenzaError("not a Hugging Face model directory: no config.json in it or below it",
                       where=str(p), fix="pass the folder holding config.json and *.safetensors")


def _read_json(path: pathlib.Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CadenzaError(f"cannot read {what}: {e}", where=str(path),
                           fix=f"restore a valid {path.name} from the checkpoint source") from None
    if not isinstance(data, dict):
        raise CadenzaError(f"{what} is not a JSON object", where=str(path),
                           fix=f"restore a valid {path.name}")
    return data


def _weight_files(d: pathlib.Path) -> list[pathlib.Path]:
    index = d / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index, "the safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CadenzaError("the index has no weight_map", where=str(index),
                               fix="restore model.safetensors.index.json from the source")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise CadenzaError(
                f"{len(missing)} of {len(names)} shards listed in {INDEX_FILE} are missing: "
                f"{', '.join(missing)}", where=str(d),
                fix="download the missing shard files into this directory")
        return [d / n for n in names]
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    files = sorted(d.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(f.name for f in d.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CadenzaError(
            f"only pickle checkpoints here ({', '.join(pickles)}); cadenza never unpickles "
            "(loading a pickle can run arbitrary code)", where=str(d),
            fix="get the safetensors version of the model, or convert it once in a trusted "
                "environment: model.save_pretrained(dir, safe_serialization=True)")
    raise CadenzaError("no *.safetensors weights in this directory", where=str(d),
                       fix="download the model's .safetensors files next to config.json")


def _open_safetensors(path: pathlib.Path):
    """``safe_open(path)`` (headers only), with the library's errors as CadenzaError."""
    try:
        return safetensors.safe_open(path, framework="numpy")
    except safetensors.SafetensorError as e:
        reason = str(e).removeprefix("Error while deserializing header: ")
        what = _HEADER_ERRORS.get(reason, "cannot read the header")
        raise CadenzaError(
            f"corrupt or truncated safetensors file: {what}; the file has "
            f"{path.stat().st_size} bytes (safetensors says: {reason})", where=str(path),
            fix="download the file again (compare its size with the source) or re-export it"
        ) from None


def open_hf_checkpoint(path, *, dtype: str | None = None) -> tuple[HFCheckpoint, ModelConfig]:
    """Open an HF model directory and build its :class:`ModelConfig` (no tensor data read).

    Raises CadenzaError for a wrong directory level, pickle-only or missing
    weights, missing shards, truncated or corrupt files, duplicate tensors,
    remote code and unsupported architectures.
    """
    d = resolve_hf_dir(path)
    hf_config = _read_json(d / "config.json", "config.json")
    config, notes = model_config_from_hf(hf_config, dtype=dtype, where=str(d / "config.json"))
    files = {f: _open_safetensors(f) for f in _weight_files(d)}
    tensors: dict[str, TensorInfo] = {}
    for path, f in files.items():
        for name in f.keys():
            if name in tensors:
                raise CadenzaError(f"tensor {name!r} appears in both {tensors[name].file.name} "
                                   f"and {path.name}", where=str(d),
                                   fix="keep one set of weight files in the directory")
            header = f.get_slice(name)
            tensors[name] = TensorInfo(path, header.get_dtype(), tuple(header.get_shape()))
    index = d / INDEX_FILE
    if index.is_file():
        listed = _read_json(index, "the safetensors index")["weight_map"]
        wrong = [n for n, shard in listed.items()
                 if n not in tensors or tensors[n].file.name != shard]
        if wrong:
            raise CadenzaError(f"{len(wrong)} tensors listed in {INDEX_FILE} are not in their "
                               f"shard (e.g. {wrong[0]!r})", where=str(d),
                               fix="the shards do not belong to this index; download them again")
    unused = sorted(f.name for f in d.glob("*.safetensors") if f not in files)
    if unused:
        notes.append(f"ignored safetensors files not part of the model: {', '.join(unused)}")
    pickles = sorted(f.name for f in d.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        notes.append(f"ignored pickle files (never loaded): {', '.join(pickles)}")
    ckpt = HFCheckpoint(d, hf_config, tensors, files, notes)
    if config.weight_quant != "none":
        ckpt.quant = hf_quant.parse(hf_config["quantization_config"], str(d / "config.json"))
        config = _quantized_targets(ckpt, config)
    return ckpt, config


def _quantized_targets(ckpt: HFCheckpoint, config: ModelConfig) -> ModelConfig:
    """``config`` with ``weight_quant_targets`` naming the projections the checkpoint
    stores quantized (a ``<base>.weight_scale`` tensor), checked to be whole projections
    (all layers) that cadenza can hold quantized (not embeddings or mixture-of-experts
    experts)."""
    paths, partial, unmappable = [], [], []
    for spec in weight_specs(config):
        flags = [ckpt.quantized(name) for _, name in spec.hf_names(config.num_layers)]
        if not any(flags):
            continue
        if spec.path[-1] != "kernel" or spec.experts:
            unmappable.append(spec.hf_name)
        elif not all(flags):
            partial.append(spec.hf_name)
        else:
            paths.append(spec.path[:-1])
    where = str(ckpt.directory)
    if unmappable:
        raise CadenzaError(f"{len(unmappable)} quantized weights cadenza keeps in float "
                           f"(embeddings, mixture-of-experts experts): {', '.join(unmappable)}",
                           where=where, fix=hf_quant.FIX)
    if partial:
        raise CadenzaError(f"weights quantized in some layers only: {', '.join(partial)}",
                           where=where, fix=hf_quant.FIX)
    if not paths:
        raise CadenzaError("config.json has a quantization_config but no weight is stored "
                           "quantized (no *.weight_scale tensor)", where=where,
                           fix="remove quantization_config from config.json, or use the "
                               "checkpoint's own config.json")
    return dataclasses.replace(config, weight_quant_targets=hf_quant.site_targets(paths))


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    shown = [f"  - {i}" for i in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        shown.append(f"  - ... and {len(items) - _MAX_LISTED} more")
    return [f"{title} ({len(items)}):"] + shown


def check_weights(ckpt: HFCheckpoint, config: ModelConfig) -> list[tuple[str, object]]:
    """Match every HF tensor to a cadenza param; raise one error listing every problem.

    Returns ``[(spec, per-tensor cadenza shape)]`` (without the layer and expert
    dims). Problems: missing tensors,
    unexpected tensors, shape mismatches (with the likely config field to fix,
    e.g. a padded vocabulary or wrong ``num_key_value_heads``) and dtypes
    that are not float.
    """
    from cadenza.models.params import abstract_params

    shapes = abstract_params(config)
    plan, missing, mismatched, bad_dtype = [], [], [], []
    expected = set()
    for spec in weight_specs(config):
        shape = get_path(shapes, spec.path).shape
        per_layer = shape[len(spec.stack_shape(config.num_layers)):]
        want = hf_shape(spec.layout, per_layer)
        for _, weight in spec.hf_names(config.num_layers):
            stored = (hf_quant.tensor_shapes(weight, want, ckpt.quant)
                      if ckpt.quantized(weight) else {weight: (want, tuple(FLOAT_TAGS))})
            for name, (shape, tags) in stored.items():
                expected.add(name)
                info = ckpt.tensors.get(name)
                if info is None:
                    missing.append(name)
                elif info.shape != shape:
                    hint = _shape_hint(spec.hf_name, info.shape, shape, config)
                    mismatched.append(f"{name}: checkpoint {list(info.shape)}, config.json "
                                      f"implies {list(shape)}{hint}")
                elif info.dtype not in tags:
                    bad_dtype.append(f"{name}: {info.dtype}, expected {' or '.join(tags)}")
        plan.append((spec, per_layer))
    ignored = [n for n in ckpt.tensors if n not in expected and n.endswith(IGNORED_SUFFIXES)]
    unexpected = sorted(n for n in ckpt.tensors if n not in expected and n not in ignored)
    if ignored:
        ckpt.notes.append(f"ignored {len(ignored)} rotary inv_freq buffers (cadenza recomputes "
                          "them from the rope config)")
    lines = (_listing("missing tensors", missing) + _listing("unexpected tensors", unexpected)
             + _listing("shape mismatches", mismatched)
             + _listing("wrong dtypes (quantized weights need a quantization_config that "
                        "cadenza maps, see docs/quantization.md)", bad_dtype))
    if lines:
        fixes = []
        if "lm_head.weight" in missing:
            fixes.append("if the model ties its output head to the embeddings, set "
                         "tie_word_embeddings: true in config.json")
        if "lm_head.weight" in unexpected:
            fixes.append("the config ties embeddings but the checkpoint has lm_head.weight: set "
                         "tie_word_embeddings: false in config.json")
        if missing and unexpected:
            fixes.append(f"compare names: expected e.g. {missing[0]!r}, found e.g. "
                         f"{unexpected[0]!r} (a different prefix means a different model class)")
        fixes.append("make config.json match the weights (the field named after each shape "
                     "mismatch), or use the checkpoint this config.json came with")
        problems = len(missing) + len(unexpected) + len(mismatched) + len(bad_dtype)
        raise CadenzaError(
            f"the weights do not match config.json ({problems} problems):\n"
            + "\n".join(lines) + "\n", where=str(ckpt.directory), fix="; ".join(fixes))
    stored = sorted({ckpt.tensors[n].dtype for n in expected if _is_float(ckpt, n)})
    if [FLOAT_TAGS[tag] for tag in stored] != [config.param_dtype]:
        ckpt.notes.append(f"the checkpoint stores {'/'.join(stored)}; cast to "
                          f"{config.param_dtype}")
    return plan


def _is_float(ckpt: HFCheckpoint, name: str) -> bool:
    """Whether tensor ``name`` is a float param (not a quantized weight's scale or codes)."""
    return ckpt.tensors[name].dtype in FLOAT_TAGS and not name.endswith(".weight_scale")


def _shape_hint(template: str, got, want, config: ModelConfig) -> str:
    hd = config.resolved_head_dim
    if template == "model.embed_tokens.weight" or template == "lm_head.weight":
        if got[1:] == want[1:] or got[:1] == want[:1]:
            return (f" (vocab: the weights have {got[0]} rows, config.json says vocab_size="
                    f"{config.vocab_size}; a padded vocabulary needs vocab_size={got[0]})")
    if template.endswith(("k_proj.weight", "v_proj.weight")) and got[0] % hd == 0:
        return (f" (kv heads: {got[0] // hd} heads of head_dim {hd} in the weights, "
                f"config.json says num_key_value_heads={config.num_kv_heads})")
    if template.endswith("q_proj.weight") and got[0] % hd == 0:
        return (f" (heads: {got[0] // hd} heads of head_dim {hd} in the weights, "
                f"config.json says num_attention_heads={config.num_heads})")
    return ""


def load_hf(hf_dir, dtype: str | None = None, mesh=None, rules=None):
    """Load an HF checkpoint as ``(model_config, params)``.

    Args:
      hf_dir: directory with config.json and safetensors (single or sharded).
      dtype: param dtype (and compute dtype) of the result; default: the
        checkpoint's declared dtype (float32 if it declares none).
      mesh: if given, each param is created directly in its shards
        (``jax.make_array_from_callback``): every device reads only its slice
        of the file (safetensors ``get_slice``), no device gets a whole-model copy.
      rules: logical-axis rules for ``mesh`` (default: MeshConfig's).

    Returns:
      ``(ModelConfig, params)`` with params in the scanned layout.

    Raises:
      CadenzaError: everything :func:`open_hf_checkpoint` and
        :func:`check_weights` refuse, all before any compilation.
    """
    _, config, params = read_hf(hf_dir, dtype=dtype, mesh=mesh, rules=rules)
    return config, params


def read_hf(hf_dir, dtype: str | None = None, mesh=None, rules=None):
    """:func:`load_hf` that also returns the opened :class:`HFCheckpoint` (with its notes)."""
    ckpt, config = open_hf_checkpoint(hf_dir, dtype=dtype)
    plan = check_weights(ckpt, config)
    for note in ckpt.notes:
        log.warning("%s: %s", ckpt.directory, note)
    shardings = None
    if mesh is not None:
        from cadenza.models.params import param_shardings

        shardings = param_shardings(config, mesh, rules)
    target = jnp.dtype(config.param_dtype)
    cast = collections.Counter(info.dtype for name, info in ckpt.tensors.items()
                               if _is_float(ckpt, name)
                               and info.dtype != _SAFETENSORS_DTYPE.get(target.name))
    if cast:
        ckpt.notes.append("cast to " + target.name + ": " + ", ".join(
            f"{n} {dt} tensor{'s' if n > 1 else ''}" for dt, n in sorted(cast.items()))
            + (" (float64 loses precision)" if "F64" in cast else ""))
    params: dict = {}
    for spec, per_layer in plan:
        if ckpt.quantized(spec.hf_names(config.num_layers)[0][1]):
            for key, value in _read_quantized(ckpt, spec, per_layer, config.num_layers).items():
                set_path(params, spec.path[:-1] + (key,), jnp.asarray(value))
            continue
        shape = spec.stack_shape(config.num_layers) + tuple(per_layer)
        read = _reader(ckpt, spec, per_layer, config.num_layers, target)
        if shardings is None:
            value = jnp.asarray(read(tuple(slice(None) for _ in shape)))
        else:
            value = jax.make_array_from_callback(shape, get_path(shardings, spec.path), read)
        set_path(params, spec.path, value)
    if ckpt.quant is not None:
        ckpt.notes.append(f"{config.weight_quant} weights (compressed-tensors codes and scales "
                          "carried over unchanged) for " + ", ".join(
                              t.replace("\\.", ".") for t in config.weight_quant_targets.split("|"))
                          + ("; they are loaded whole on the default device, not sharded"
                             if mesh is not None else ""))
    return ckpt, config, params


def _read_quantized(ckpt: HFCheckpoint, spec, per_layer, num_layers: int) -> dict:
    """cadenza's quantized arrays (:func:`hf_quant.to_cadenza`, stacked over layers) of the
    kernel ``spec`` from its stored codes and scales; checks each ``weight_shape`` and
    that the scales are finite."""
    q, want = ckpt.quant, hf_shape(spec.layout, tuple(per_layer))
    n_in = 2 if spec.layout == HEADS_OUT else 1
    layers = []
    for _, weight in spec.hf_names(num_layers):
        base = hf_quant.base_name(weight)
        stored = tuple(int(v) for v in ckpt.tensor(f"{base}.weight_shape")[:])
        if stored != want:
            raise CadenzaError(f"{base}.weight_shape is {list(stored)}, config.json implies "
                               f"{list(want)}",
                               where=str(ckpt.tensors[f"{base}.weight_shape"].file),
                               fix="use the config.json that came with the checkpoint")
        codes = hf_quant.read_codes(ckpt.tensor(f"{base}.weight_packed")[:], want, q)
        scale = ckpt.tensor(f"{base}.weight_scale")[:]
        check_finite(scale, f"{base}.weight_scale", ckpt.tensors[f"{base}.weight_scale"].file)
        layers.append(hf_quant.to_cadenza(codes, scale, tuple(per_layer), n_in, q))
    if not spec.layered:
        return layers[0]
    return {key: np.stack([arrays[key] for arrays in layers]) for key in layers[0]}


_SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16",
                      "float64": "F64"}


def check_finite(values, name: str, where) -> None:
    """Raise a :class:`CadenzaError` if the float array ``values`` (the tensor ``name``
    read from the file ``where``) holds NaN or inf: such weights decode garbage."""
    values = np.asarray(values)
    if values.dtype.kind in "fV" or values.dtype.name == "bfloat16":
        bad = int(values.size - np.count_nonzero(np.isfinite(values.astype(np.float32))))
        if bad:
            raise CadenzaError(f"tensor {name} holds {bad} NaN/inf value{'s' * (bad > 1)}",
                               where=str(where), fix="the checkpoint is corrupt or was saved "
                               "from a diverged run: re-download or re-export it")


def _reader(ckpt: HFCheckpoint, spec, per_layer, num_layers: int, dtype):
    """``read(index) -> np.ndarray``: the block ``index`` (slices in cadenza layout) of a leaf."""

    def block(name, index):
        values = read_block(spec.layout, ckpt.tensor(name), per_layer, index)
        check_finite(values, name, ckpt.tensors[name].file)
        return values

    def read(index):
        return read_stacked(spec, num_layers, block, index).astype(dtype, copy=False)

    return read


def import_hf(hf_dir, out_dir, *, dtype: str | None = None, mesh=None, rules=None
              ) -> tuple[pathlib.Path, list[str]]:
    """Convert an HF checkpoint into a cadenza model directory at ``out_dir``.

    Writes config.yaml (the resolved experiment config with the imported
    model section), the params (:func:`cadenza.models.checkpoint.save_model`) and
    tokenizer/ (the HF tokenizer and generation files present: see
    :data:`TOKENIZER_FILES`). Returns the
    directory and the notes (choices made, files copied or ignored).
    """
    from cadenza.config import ExperimentConfig
    from cadenza.models.checkpoint import is_model_dir, save_model

    if is_model_dir(out_dir):  # fail before reading any weights
        raise CadenzaError("a model directory already exists here", where=str(out_dir),
                           fix="choose a new output directory or delete the old one")
    ckpt, config, params = read_hf(hf_dir, dtype=dtype, mesh=mesh, rules=rules)
    d = ckpt.directory
    experiment = ExperimentConfig(name=d.name, model=config)
    copied = [n for n in TOKENIZER_FILES if (d / n).is_file()]
    with tempfile.TemporaryDirectory() as staging:
        for name in copied:
            (pathlib.Path(staging) / name).write_bytes((d / name).read_bytes())
        out = save_model(out_dir, experiment, params, tokenizer_dir=staging if copied else None)
    notes = ckpt.notes + [f"copied tokenizer files: {', '.join(copied) or 'none found'}"]
    return out, notes
