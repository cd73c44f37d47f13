"""cadenza model directories: the resolved config, the params and (optionally) the tokenizer.

Layout of a model directory (written by HF import, training export, adapter merge)::

    DIR/config.yaml     the resolved ExperimentConfig (``cadenza.config.to_yaml``)
    DIR/params/         the params pytree, an orbax StandardCheckpointer checkpoint
                        (a quantised model, ``model.weight_quant`` set: the targeted
                        projections hold :mod:`cadenza.models.quant`'s arrays)
    DIR/tokenizer/      tokenizer files (tokenizer.json, tokenizer_config.json, ...), optional
    DIR/.cadenza-complete  the completeness marker (``cadenza.outputs``): the directory is
                        written under a temporary name and renamed when whole

Params are restored directly into their shards when a mesh is given.
"""

import logging
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp

from cadenza.config import ExperimentConfig, load_config, to_yaml
from cadenza.errors import CadenzaError, ConfigError, one_line
from cadenza.models.hf_folder import has_tokenizer, is_hf_folder, load_hf_folder
from cadenza.outputs import atomic_dir, is_complete, require_complete
from cadenza.remote import local_model_dir


def save_model(directory, config: ExperimentConfig, params, tokenizer_dir=None) -> pathlib.Path:
    """Write ``config``, ``params`` and a copy of ``tokenizer_dir``'s files to ``directory``.

    ``directory`` must not exist or be empty (no silent overwrite). It is written under
    a temporary sibling name and renamed into place when complete
    (:func:`cadenza.outputs.atomic_dir`). Returns its path.
    """
    d = pathlib.Path(directory).absolute()
    with atomic_dir(d) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "config.yaml").write_text(to_yaml(config))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer", dirs_exist_ok=True)
    return d


def _written_before_markers(d: pathlib.Path) -> bool:
    """A model directory saved by a cadenza older than completeness markers: no marker,
    but orbax committed its params (orbax writes them atomically)."""
    old = not is_complete(d) and (d / "params" / "commit_success.txt").is_file()
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
    from cadenza.models.params import abstract_params, param_shardings

    d = local_model_dir(directory).absolute()
    if not d.is_dir():
        raise CadenzaError("no such model directory", where=str(d),
                           fix="check the path (a cadenza model directory or a Hugging Face "
                               "folder with config.json and *.safetensors)")
    if is_hf_folder(d):
        return load_hf_folder(d, mesh=mesh, rules=rules)
    if not (d / "config.yaml").is_file() or not (d / "params").is_dir():
        raise CadenzaError("not a cadenza model directory (needs config.yaml and params/)",
                           where=str(d),
                           fix="pass the directory written by 'cadenza convert hf-import' or "
                               "by training (its model/ folder), or a Hugging Face folder "
                               "(config.json and *.safetensors)")
    if not _written_before_markers(d):
        require_complete(d, "model directory")
    config = load_config(d / "config.yaml")
    target = abstract_params(config.model)
    if config.model.weight_quant != "none":   # the layout cadenza.models.quant writes
        from cadenza.models.quant import quantize_params

        target = jax.eval_shape(lambda p: quantize_params(p, config.model), target)
    if mesh is not None and config.model.weight_quant != "none":  # quantised: replicated
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        shardings = jax.tree.map(lambda _: rep, target)
    elif mesh is not None:
        shardings = param_shardings(config.model, mesh, rules or config.mesh.rules())
    else:  # one local device, whatever device set the params were saved from
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: one, target)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          target, shardings)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(d / "params", target)
    except Exception as e:  # orbax/tensorstore: corrupt, truncated or mis-shaped arrays
        raise CadenzaError(f"cannot read the params ({one_line(e)})",
                           where=str(d / "params"),
                           fix="the files are corrupt, truncated or do not match config.yaml's "
                               "model; re-create the directory (rerun the export or import)")\
            from e
    return config, params


# The files that define what ids a tokenizer produces (not its chat template or settings).
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


def vocabulary_fingerprint(tokenizer_folder) -> str | None:
    """sha256 over the vocabulary-defining files (:data:`VOCABULARY_FILES`) of a tokenizer
    folder, or None when it holds none of them."""
    import hashlib

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
