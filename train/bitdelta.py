"""BitDelta: store a fine-tune as one bit per weight against its base model.

Each projection matrix of the transformer layers (every param under ``layers`` with a
layer axis and at least two more axes) is stored as the sign of its delta
``Delta = theta_ft - theta_0`` (one bit per entry, packed) and one float32 scale per
layer slice, ``alpha = mean |Delta|`` (the paper's initial scale, without its scale
distillation): ``theta ~ theta_0 + alpha * sign(Delta)`` with ``sign(0) = +1``. Every
other param (embeddings, LM head, norms, biases) is stored exactly, as the fine-tune's
own value. A float32 model shrinks to about 1/32 of its layers' bytes plus the exact part.

A BitDelta directory::

    DIR/config.yaml             the fine-tune's ExperimentConfig
    DIR/bitdelta.safetensors    per param path P: ``P:signs`` (uint8, packed bits of the
                                flattened delta's signs), ``P:scales`` (float32, one per
                                layer) or ``P:value`` (the exact fine-tuned array)
    DIR/bitdelta.json           base and fine-tune paths, the base's fingerprint, which
                                params are compressed and byte counts

:func:`compress` makes the parts from two param trees, :func:`reconstruct` applies them
to a base tree, :func:`save_bitdelta` / :func:`load_bitdelta` write and read directories.
``cadenza convert bitdelta`` writes one; ``cadenza convert merge`` takes one as a
``--models`` input (``--method linear`` with it alone gives the reconstructed fine-tune).

Signs and scales only mean something on the base they were taken from, so the base's
:func:`params_fingerprint` is recorded and :func:`apply_bitdelta` refuses another base.
"""

import functools
import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from cadenza.errors import CadenzaError
from cadenza.outputs import atomic_dir, save_safetensors

WEIGHTS_FILE = "bitdelta.safetensors"
RECORD_FILE = "bitdelta.json"
FINGERPRINT_SAMPLES = 4096   # entries of each param array read into the fingerprint


def is_compressed(path_keys, leaf, stacked_key: str = "layers") -> bool:
    """Whether the param at ``path_keys`` (a key path) is stored as signs and scales: a
    leaf under the top-level ``stacked_key`` with a layer axis and >= 2 more axes."""
    return (bool(path_keys) and getattr(path_keys[0], "key", None) == stacked_key
            and leaf.ndim >= 3)


@jax.jit
def _sign_scale(base, model):
    delta = model.astype(jnp.float32) - base.astype(jnp.float32)
    scales = jnp.mean(jnp.abs(delta), axis=tuple(range(1, delta.ndim)))
    return delta >= 0, scales


def compress(base, model) -> dict:
    """The BitDelta parts of ``model`` against ``base`` (same structure and shapes):
    ``{keystr path: {"signs": uint8 [ceil(size/8)], "scales": float32 [layers]} or
    {"value": the exact model leaf as NumPy}}``, leaf by leaf (one leaf on the host at a
    time)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(base)
    leaves, tdef = jax.tree.flatten(model)
    if tdef != treedef or any(a.shape != b.shape for (_, a), b in zip(flat, leaves)):
        raise CadenzaError("the fine-tune has another param structure or shape than the base",
                           where="bitdelta.model", fix="compress a fine-tune of this base")
    parts = {}
    for (kp, b), m in zip(flat, leaves):
        path = jax.tree_util.keystr(kp)
        if is_compressed(kp, b):
            positive, scales = jax.device_get(_sign_scale(b, m))
            parts[path] = {"signs": np.packbits(np.asarray(positive).ravel()),
                           "scales": np.asarray(scales, np.float32)}
        else:
            parts[path] = {"value": np.asarray(jax.device_get(m))}
    return parts


def reconstruct(base, parts: dict):
    """``base`` with every param replaced by its BitDelta reconstruction from ``parts``
    (:func:`compress`): ``base + scale * sign`` in float32, cast to the base leaf's dtype,
    for compressed leaves; the stored value for the others. Keeps the base's shardings."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(base)
    missing = [jax.tree_util.keystr(kp) for kp, _ in flat if jax.tree_util.keystr(kp) not in parts]
    if missing or len(parts) != len(flat):
        raise CadenzaError(f"the BitDelta parts do not match the base's params (missing "
                           f"{missing[:1] or 'none'}, {len(parts)} stored for {len(flat)})",
                           where="bitdelta", fix="apply it to the base it was made from")
    out = []
    for kp, b in flat:
        part = parts[jax.tree_util.keystr(kp)]
        if "value" in part:
            value = jnp.asarray(part["value"], b.dtype)
            sharding = getattr(b, "sharding", None)
            out.append(jax.device_put(value, sharding) if sharding is not None else value)
            continue
        bits = np.unpackbits(part["signs"], count=b.size).reshape(b.shape)
        out.append(_apply(b, jnp.asarray(bits), jnp.asarray(part["scales"])))
    return jax.tree.unflatten(treedef, out)


@jax.jit
def _apply(base, bits, scales):
    sign = bits.astype(jnp.float32) * 2.0 - 1.0
    scale = scales.reshape(scales.shape + (1,) * (base.ndim - 1))
    return (base.astype(jnp.float32) + scale * sign).astype(base.dtype)


@functools.partial(jax.jit, static_argnums=1)
def _strided(leaf, stride: int):
    return leaf.reshape(-1)[::stride][:FINGERPRINT_SAMPLES].astype(jnp.float32)


def params_fingerprint(params) -> str:
    """A sha256 hex digest of a param tree: every leaf's path and shape and up to
    :data:`FINGERPRINT_SAMPLES` of its entries, evenly strided, as float32 (gathered from
    its shards; the tree is never read whole). The same weights give the same digest
    whatever their sharding or storage dtype (bfloat16 and its float32 copy agree); another
    checkpoint of a model differs in nearly every entry and so in the digest (a change of a
    few single weights between samples is not seen)."""
    digest = hashlib.sha256()
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        digest.update(f"{jax.tree_util.keystr(kp)}{tuple(leaf.shape)}".encode())
        sample = _strided(leaf, max(1, leaf.size // FINGERPRINT_SAMPLES))
        digest.update(np.asarray(jax.device_get(sample)).tobytes())
    return digest.hexdigest()


def _nbytes(parts: dict) -> int:
    return sum(a.nbytes for part in parts.values() for a in part.values())


def save_bitdelta(directory, config, parts: dict, *, base_dir, model_dir,
                  base_fingerprint: str) -> dict:
    """Write the BitDelta directory ``directory`` (must not exist) for the fine-tune's
    ``config`` (ExperimentConfig) and ``parts``; returns the record written to
    ``bitdelta.json`` (paths, ``base_fingerprint`` (:func:`params_fingerprint` of the base),
    which params are compressed / exact, and ``bytes``: stored)."""

    from cadenza.config import to_yaml

    d = pathlib.Path(directory).absolute()
    if d.exists():
        raise CadenzaError("the output directory already exists", where=str(d),
                           fix="choose a new output directory or delete the old one")
    tensors = {f"{path}:{name}": np.ascontiguousarray(a)
               for path, part in parts.items() for name, a in part.items()}
    compressed = [p for p, part in parts.items() if "signs" in part]
    record = {"base": str(pathlib.Path(base_dir).absolute()),
              "model": str(pathlib.Path(model_dir).absolute()),
              "base_fingerprint": base_fingerprint,
              "compressed": compressed,
              "exact": [p for p in parts if p not in compressed],
              "bytes": _nbytes(parts)}
    with atomic_dir(d) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "config.yaml").write_text(to_yaml(config))
        save_safetensors(tmp / WEIGHTS_FILE, tensors)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1))
    return record


def is_bitdelta_dir(directory) -> bool:
    """Whether ``directory`` holds a BitDelta (config.yaml and bitdelta.safetensors)."""
    d = pathlib.Path(directory)
    return (d / "config.yaml").is_file() and (d / WEIGHTS_FILE).is_file()


def load_bitdelta(directory) -> dict:
    """The parts stored in the BitDelta directory ``directory`` (as :func:`compress`
    returns them, NumPy arrays)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    d = pathlib.Path(directory)
    try:
        tensors = load_file(str(d / WEIGHTS_FILE))
    except (OSError, SafetensorError) as e:
        raise CadenzaError(f"cannot read {WEIGHTS_FILE} ({e})", where=str(d),
                           fix="the file is corrupt or truncated; write it again with "
                               "'cadenza convert bitdelta'") from e
    parts: dict = {}
    for key, a in tensors.items():
        path, _, name = key.rpartition(":")
        parts.setdefault(path, {})[name] = a
    return parts


def apply_bitdelta(directory, base, base_dir="the given base"):
    """The fine-tune stored in the BitDelta directory ``directory``, rebuilt on the param
    tree ``base`` (:func:`reconstruct`, read from ``base_dir``). Fails, naming both bases,
    when ``base`` is not the base it was made from (their :func:`params_fingerprint`
    differ) or the directory records no fingerprint."""
    d = pathlib.Path(directory)
    try:
        record = json.loads((d / RECORD_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CadenzaError(f"cannot read {RECORD_FILE} ({e})", where=str(d),
                           fix="write it again with 'cadenza convert bitdelta'") from e
    made_from = record.get("base_fingerprint")
    if made_from is None:
        raise CadenzaError("the BitDelta records no fingerprint of its base", where=str(d),
                           fix="write it again with 'cadenza convert bitdelta'")
    given = params_fingerprint(base)
    if given != made_from:
        raise CadenzaError(
            f"the BitDelta was made from the base {record.get('base')} (fingerprint "
            f"{made_from[:12]}) but is applied to {base_dir} (fingerprint {given[:12]}), "
            "another model", where=str(d),
            fix="apply it to the base it was made from, or compress the fine-tune against "
                "this base with 'cadenza convert bitdelta'")
    return reconstruct(base, load_bitdelta(d))


def compress_models(base_dir, model_dir, out_dir, *, progress=None) -> dict:
    """Compress the model directory or Hugging Face folder ``model_dir`` against the base
    ``base_dir`` into the new BitDelta directory ``out_dir``; checks both configs (same
    architecture, named field by field) before reading weights. Returns the record with
    ``model_bytes`` (the fine-tune's params) added."""
    from cadenza.models.checkpoint import load_model
    from cadenza.train.merge import check_inputs

    say = progress or (lambda _: None)
    out = pathlib.Path(out_dir).absolute()
    if out.exists():
        raise CadenzaError("the output directory already exists", where=str(out),
                           fix="choose a new output directory or delete the old one")
    _, kinds = check_inputs(base_dir, [model_dir])
    if kinds[0] not in ("model", "hf"):
        raise CadenzaError(f"cannot compress a {kinds[0]} directory", where=str(model_dir),
                           fix="pass a fine-tuned model directory or Hugging Face folder "
                               "(fold adapters in first: 'cadenza convert merge --method "
                               "linear')")
    _, base = load_model(base_dir)
    config, model = load_model(model_dir)
    say(f"compressing {model_dir} against {base_dir}")
    parts = compress(base, model)
    record = save_bitdelta(out, config, parts, base_dir=base_dir, model_dir=model_dir,
                           base_fingerprint=params_fingerprint(base))
    return {**record, "model_bytes": sum(x.nbytes for x in jax.tree.leaves(model))}
