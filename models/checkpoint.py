"""cadenza model directories: the resolved config, the params and (optionally) the tokenizer.

Layout of a model directory (written by HF import, training export, adapter merge)::

    DIR/config.yaml     the resolved ExperimentConfig (``cadenza.config.to_yaml``)
    DIR/params.safetensors  the params pytree, one safetensors file (written by a
                        single process): one tensor per leaf, named by its path joined
                        with "/" (``layers/attn/q/kernel``), in the config's dtypes (bf16,
                        int8, uint8, ...); header metadata ``{"format": "cadenza-params",
                        "model": <digest of the model section the params were checked for>}``
    DIR/params/         or: an orbax StandardCheckpointer checkpoint (what several
                        processes write, each its own shards; also every directory
                        written by cadenza before params.safetensors)
                        (a quantised model, ``model.weight_quant`` set: the targeted
                        projections hold :mod:`cadenza.models.quant`'s arrays in both)
    DIR/tokenizer/      tokenizer files (tokenizer.json, tokenizer_config.json, ...), optional
    DIR/.cadenza-complete  the completeness marker (``cadenza.outputs``): the directory is
                        written under a temporary name and renamed when whole

Params are restored directly into their shards when a mesh is given. Reading a
params.safetensors directory needs neither orbax nor tensorstore (``cadenza generate``
starts faster).
"""

import collections
import hashlib
import logging
import pathlib
import shutil

import jax
import numpy as np

from cadenza.config import ExperimentConfig, load_config, to_yaml
from cadenza.errors import CadenzaError, ConfigError, one_line
from cadenza.models.hf_folder import has_tokenizer, is_hf_folder, load_hf_folder
from cadenza.outputs import atomic_dir, is_complete, require_complete, save_safetensors
from cadenza.remote import local_model_dir

PARAMS_FILE = "params.safetensors"   # single-process writes
ORBAX_PARAMS = "params"               # multi-process writes, and older directories
PARAMS_FORMATS = ("safetensors", "orbax")
_METADATA = {"format": "cadenza-params"}


def save_model(directory, config: ExperimentConfig, params, tokenizer_dir=None, *,
               params_format: str | None = None) -> pathlib.Path:
    """Write ``config``, ``params`` and a copy of ``tokenizer_dir``'s files to ``directory``.

    ``params`` is a nested dict of arrays (plain or quantised by
    :mod:`cadenza.models.quant`). ``params_format``: ``"safetensors"``
    (``params.safetensors``; the default in a single-process run; the params are copied to
    host memory while writing, and first checked against ``config.model``: a missing,
    unexpected or mis-shaped leaf is a CadenzaError, a leaf in another dtype is cast to the
    config's with a warning counting the casts) or ``"orbax"`` (``params/``; the default
    with several processes, each writing its own shards; stored as given). ``directory``
    must not exist or be empty (no silent overwrite). It is written under a temporary
    sibling name and renamed into place when complete (:func:`cadenza.outputs.atomic_dir`).
    Returns its path.
    """
    if params_format is None:
        params_format = "orbax" if jax.process_count() > 1 else "safetensors"
    if params_format not in PARAMS_FORMATS:
        raise ConfigError(f"unknown params format {params_format!r}", where="params_format",
                          fix=f"use one of {', '.join(PARAMS_FORMATS)}")
    d = pathlib.Path(directory).absolute()
    with atomic_dir(d) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "config.yaml").write_text(to_yaml(config))
        if params_format == "safetensors":
            _save_safetensors(tmp / PARAMS_FILE, _fitted(params, config.model), config.model)
        else:
            import orbax.checkpoint as ocp

            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(tmp / ORBAX_PARAMS, params)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer", dirs_exist_ok=True)
    return d


def _leaf_name(path) -> str:
    """A params leaf's tensor name: its dict keys joined with "/"."""
    keys = []
    for k in path:
        if not isinstance(k, jax.tree_util.DictKey) or "/" in str(k.key):
            raise CadenzaError(f"cannot store the params leaf {jax.tree_util.keystr(path)} "
                               "(params must be nested dicts with keys free of '/')",
                               where="save_model", fix="pass the model's params dict")
        keys.append(str(k.key))
    return "/".join(keys)


def _model_key(model_config) -> str:
    """A digest of the model section a params file was written (and checked) for."""
    return hashlib.sha256(repr(model_config).encode()).hexdigest()


def _expected(model_config):
    """The abstract params (``ShapeDtypeStruct`` leaves) of the model section: the plain
    tree, or the layout :mod:`cadenza.models.quant` writes when ``weight_quant`` is set."""
    from cadenza.models.params import abstract_params

    target = abstract_params(model_config)
    if model_config.weight_quant != "none":
        from cadenza.models.quant import quantize_params

        target = jax.eval_shape(lambda p: quantize_params(p, model_config), target)
    return target


def _same_names(want, got, where: str, fix: str) -> None:
    """CadenzaError unless the tensor-name collections ``want`` and ``got`` are equal,
    counting (and naming up to three of) the missing and the unexpected names."""
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise CadenzaError(f"the params do not match the config's model: {len(missing)} "
                           f"missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. "
                           f"{extra[:3]})", where=where, fix=fix)


def _fitted(params, model_config):
    """``params`` checked against the model section: the same leaves (:func:`_same_names`)
    and shapes, else a CadenzaError; a leaf in another dtype is cast to the config's, the
    casts counted in a warning (restoring an orbax checkpoint casts the same way)."""
    fix = "save the params of the model the config describes"
    want = {_leaf_name(p): a for p, a in jax.tree_util.tree_leaves_with_path(
        _expected(model_config))}
    got = {_leaf_name(p): a for p, a in jax.tree_util.tree_leaves_with_path(params)}
    _same_names(want, got, "save_model", fix)
    casts = collections.Counter()
    for name, a in got.items():
        if a.shape != want[name].shape:
            raise CadenzaError(f"params leaf {name} has shape {list(a.shape)}; the config's "
                               f"model needs {list(want[name].shape)}", where="save_model",
                               fix=fix)
        if a.dtype != want[name].dtype:
            casts[f"{a.dtype}->{want[name].dtype}"] += 1
    if not casts:
        return params
    logging.getLogger("cadenza").warning(
        "save_model: params cast to the config's dtypes: %s",
        ", ".join(f"{n} {k}" for k, n in sorted(casts.items())))
    return jax.tree.map(lambda a, w: a.astype(w.dtype), params, _expected(model_config))


def _save_safetensors(path: pathlib.Path, params, model_config) -> None:
    """Write ``params`` to the safetensors file ``path`` (arrays copied to host memory),
    the header recording the model section they fit (:func:`_model_key`)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for p, leaf in leaves:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            raise CadenzaError(f"params leaf {_leaf_name(p)} is spread over several "
                               "processes", where="save_model",
                               fix="save with params_format='orbax' (each process writes "
                                   "its shards)")
    arrays = {_leaf_name(p): np.asarray(leaf, order="C") for p, leaf in leaves}
    save_safetensors(path, arrays, {**_METADATA, "model": _model_key(model_config)})


def is_model_dir(path) -> bool:
    """Whether ``path`` holds a cadenza model directory's files: config.yaml and its params
    (params.safetensors or an orbax params/ folder); completeness is not checked."""
    d = pathlib.Path(path)
    return (d / "config.yaml").is_file() and ((d / PARAMS_FILE).is_file()
                                              or (d / ORBAX_PARAMS).is_dir())


def _written_before_markers(d: pathlib.Path) -> bool:
    """A model directory saved by a cadenza older than completeness markers: no marker,
    but orbax committed its params (orbax writes them atomically)."""
    old = not is_complete(d) and (d / ORBAX_PARAMS / "commit_success.txt").is_file()
    if old:
        logging.getLogger("cadenza").info(
            "%s: written by an older cadenza (no completeness marker); its params are "
            "complete (orbax committed them)", d)
    return old


def load_model(directory, mesh=None, rules=None):
    """Read a model directory, or a Hugging Face folder converted in memory
    (:mod:`cadenza.models.hf_folder`): returns ``(ExperimentConfig, params)``. A URL
    (``gs://...``) is read from its local copy (:func:`cadenza.remote.local_model_dir`).

    With ``mesh`` (and logical-axis ``rules``, default: the config's mesh
    rules), every param is restored straight into its shard; without, onto the
    first local device (also when the params were saved from a sharded run).
    """
    d = local_model_dir(directory).absolute()
    if not d.is_dir():
        raise CadenzaError("no such model directory", where=str(d),
                           fix="check the path (a cadenza model directory or a Hugging Face "
                               "folder with config.json and *.safetensors)")
    if is_hf_folder(d):
        return load_hf_folder(d, mesh=mesh, rules=rules)
    if not is_model_dir(d):
        raise CadenzaError("not a cadenza model directory (needs config.yaml and "
                           f"{PARAMS_FILE} or params/)",
                           where=str(d),
                           fix="pass the directory written by 'cadenza convert hf-import' or "
                               "by training (its model/ folder), or a Hugging Face folder "
                               "(config.json and *.safetensors)")
    if not _written_before_markers(d):
        require_complete(d, "model directory")
    config = load_config(d / "config.yaml")
    where = d / (PARAMS_FILE if (d / PARAMS_FILE).is_file() else ORBAX_PARAMS)
    try:
        if where.name == PARAMS_FILE:
            params = _restore_safetensors(where, config, mesh, rules)
        else:
            import orbax.checkpoint as ocp

            with ocp.StandardCheckpointer() as ckptr:
                params = ckptr.restore(where, _target(config, mesh, rules))
    except CadenzaError:
        raise
    except Exception as e:  # orbax/tensorstore/safetensors: corrupt, truncated, mis-shaped
        raise CadenzaError(f"cannot read the params ({one_line(e)})", where=str(where),
                           fix=_REWRITE) from e
    return config, params


def _target(config: ExperimentConfig, mesh, rules):
    """The params to restore: :func:`_expected`'s leaves with their shardings (with a mesh:
    by the logical-axis rules, a quantised model replicated; without: the first local
    device, whatever device set the params were saved from)."""
    from cadenza.models.params import param_shardings

    target = _expected(config.model)
    if mesh is not None and config.model.weight_quant != "none":  # quantised: replicated
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        shardings = jax.tree.map(lambda _: rep, target)
    elif mesh is not None:
        shardings = param_shardings(config.model, mesh, rules or config.mesh.rules())
    else:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: one, target)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        target, shardings)


_REWRITE = ("the files are corrupt, truncated or do not match config.yaml's model; "
            "re-create the directory (rerun the export or import)")


def _restore_safetensors(path: pathlib.Path, config: ExperimentConfig, mesh, rules):
    """The params of the safetensors file ``path``. Written for this very model section
    (its header's model digest) and read onto one device: the tree is rebuilt from the
    tensor names, as checked when it was saved. Otherwise every tensor is checked against
    :func:`_target` (names, shapes, dtypes) and put into its sharding."""
    import safetensors

    with safetensors.safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _METADATA["format"]:
            raise CadenzaError(f"{PARAMS_FILE} is not a cadenza params file (its header "
                               f"metadata is {meta})", where=str(path), fix=_REWRITE)
        if mesh is None and meta.get("model") == _model_key(config.model):
            names = sorted(f.keys())
            values = jax.device_put([f.get_tensor(n) for n in names],
                                    jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
            params = {}
            for name, value in zip(names, values):
                *parents, leaf = name.split("/")
                node = params
                for key in parents:
                    node = node.setdefault(key, {})
                node[leaf] = value
            return params
        leaves, treedef = jax.tree_util.tree_flatten_with_path(_target(config, mesh, rules))
        names = [_leaf_name(p) for p, _ in leaves]
        _same_names(names, f.keys(), str(path), _REWRITE)
        arrays = []
        for name, (_, want) in zip(names, leaves):
            got = f.get_tensor(name)
            if got.shape != want.shape or got.dtype != want.dtype:
                raise CadenzaError(f"params tensor {name} is {got.dtype}{list(got.shape)}; "
                                   f"config.yaml's model needs {want.dtype}"
                                   f"{list(want.shape)}", where=str(path), fix=_REWRITE)
            arrays.append(got)
    if mesh is None:
        out = jax.device_put(arrays, [want.sharding for _, want in leaves])
    else:
        out = [jax.make_array_from_callback(a.shape, want.sharding, lambda i, a=a: a[i])
               for a, (_, want) in zip(arrays, leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


# The files that define what ids a tokenizer produces (not its chat template or settings).
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


def vocabulary_fingerprint(tokenizer_folder) -> str | None:
    """sha256 over the vocabulary-defining files (:data:`VOCABULARY_FILES`) of a tokenizer
    folder, or None when it holds none of them."""
    digest, found = hashlib.sha256(), False
    for name in VOCABULARY_FILES:
        path = pathlib.Path(tokenizer_folder) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
            found = True
    return digest.hexdigest() if found else None


def check_same_tokenizer(ours, theirs, *, what: str, where: str, fix: str) -> None:
    """Raise a :class:`ConfigError` when the tokenizer folders ``ours`` and ``theirs`` (e.g.
    a target's and its draft's; None: no tokenizer, nothing to compare) define different
    vocabularies (:func:`vocabulary_fingerprint`), naming both fingerprints; ``what``
    names the second model in the message."""
    fa = vocabulary_fingerprint(ours) if ours is not None else None
    fb = vocabulary_fingerprint(theirs) if theirs is not None else None
    if fa is not None and fb is not None and fa != fb:
        raise ConfigError(f"{what}'s tokenizer (sha256 {fb[:16]}, {theirs}) differs from this "
                          f"model's (sha256 {fa[:16]}, {ours}), although the vocabulary sizes "
                          "may match", where=where, fix=fix)


def tokenizer_dir(directory) -> pathlib.Path | None:
    """The model directory's tokenizer folder (a Hugging Face folder itself when it holds
    tokenizer files), or None if it has none."""
    if is_hf_folder(directory):
        return pathlib.Path(directory) if has_tokenizer(directory) else None
    t = pathlib.Path(directory) / "tokenizer"
    return t if t.is_dir() else None
