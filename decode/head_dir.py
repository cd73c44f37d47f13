"""Trained head directories: one format for Medusa and Hydra heads and the SpecDec++ acceptance
head.

Layout::

    DIR/head.json           {"kind": "medusa" | "hydra" | "accept", "format": 1, ...fields}
    DIR/params.safetensors  the head params, float32, flat keys "a/b/c" (no pickling)

The metadata names the shapes the head was trained for (e.g. the base model's
vocabulary and hidden sizes); :func:`check_meta` compares them with the model
the head is loaded for, and :func:`load_head_dir` checks every param's shape,
so a mismatch fails with both values named before anything is compiled.
Writers: :func:`cadenza.decode.medusa.save_tree_heads` (Medusa, Hydra),
:func:`cadenza.decode.specdec_head.save_accept_head` (and ``cadenza train`` with
``train.task`` medusa / hydra / specdec).
"""

import json
import pathlib

import numpy as np

from cadenza.errors import CadenzaError

FORMAT = 1
META, PARAMS = "head.json", "params.safetensors"


def save_head_dir(directory, kind: str, meta: dict, params) -> pathlib.Path:
    """Write ``params`` (a nested dict of arrays) and ``meta`` (JSON-serialisable) to a new
    directory, atomically (a temporary sibling renamed into place); refuses to overwrite
    one that already holds a head. Returns its path."""
    from flax.traverse_util import flatten_dict

    from cadenza.outputs import atomic_dir, save_safetensors

    d = pathlib.Path(directory).absolute()
    if (d / PARAMS).exists():
        raise CadenzaError("a head directory already exists here", where=str(d),
                           fix="choose a new output directory or delete the old one")
    flat = {"/".join(k): np.ascontiguousarray(np.asarray(v, np.float32))
            for k, v in flatten_dict(params).items()}
    # written whole under a temporary name, then renamed (an empty folder is replaced)
    with atomic_dir(d, replace=d.is_dir() and not any(d.iterdir())) as tmp:
        tmp.mkdir(parents=True)
        save_safetensors(tmp / PARAMS, flat)
        (tmp / META).write_text(json.dumps({"kind": kind, "format": FORMAT, **meta},
                                           indent=2) + "\n")
    return d


def read_meta(directory, kind: str) -> dict:
    """The metadata of a head directory of ``kind`` (CadenzaError if it is not one)."""
    d = pathlib.Path(directory).absolute()
    if not (d / META).is_file() or not (d / PARAMS).is_file():
        raise CadenzaError(f"not a head directory (needs {META} and {PARAMS})", where=str(d),
                           fix=f"pass the directory written by training the {kind} head "
                               "(cadenza train with train.task; its adapters/ folder)")
    meta = json.loads((d / META).read_text())
    if meta.get("kind") != kind or meta.get("format") != FORMAT:
        raise CadenzaError(f"holds a {meta.get('kind')!r} head (format {meta.get('format')}), "
                           f"not a {kind!r} head (format {FORMAT})", where=str(d),
                           fix=f"pass a {kind} head directory")
    return meta


def check_meta(meta: dict, expected: dict, directory, against: str) -> None:
    """Raise unless ``meta[k] == v`` for every ``k, v`` in ``expected``, naming both values."""
    diffs = [f"{k}: the head has {meta.get(k)!r}, {against} has {v!r}"
             for k, v in expected.items() if meta.get(k) != v]
    if diffs:
        raise CadenzaError(f"the head was trained for a different model ({'; '.join(diffs)})",
                           where=str(pathlib.Path(directory).absolute()),
                           fix=f"use a head trained on {against}, or retrain it")


def load_head_dir(directory, kind: str, abstract):
    """Read a head directory of ``kind``: returns ``(meta, params)``.

    ``abstract``: the expected params pytree (arrays or ``jax.ShapeDtypeStruct`` s); a
    missing, extra or differently shaped param raises CadenzaError naming it.
    Params come back as float32 jax arrays in ``abstract``'s structure.
    """
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict, unflatten_dict
    from safetensors.numpy import load_file

    meta = read_meta(directory, kind)
    d = pathlib.Path(directory).absolute()
    flat = load_file(str(d / PARAMS))
    want = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(abstract).items()}
    got = {k: tuple(v.shape) for k, v in flat.items()}
    if want != got:
        bad = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        raise CadenzaError(f"the params do not fit the head: {bad[0]} has "
                           f"{got.get(bad[0])}, expected {want.get(bad[0])}",
                           where=str(d / PARAMS), fix="pass a directory written by cadenza "
                                                      "for this head")
    return meta, unflatten_dict({tuple(k.split("/")): jnp.asarray(v, jnp.float32)
                                 for k, v in flat.items()})
