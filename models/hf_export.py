"""Export cadenza models as Hugging Face checkpoints that transformers loads.

:func:`save_hf` writes config.json, safetensors (sharded with an index when
larger than ``max_shard_bytes``) and the tokenizer/generation files of a
cadenza model directory, in the layout ``AutoModelForCausalLM`` reads.
"""

import json
import pathlib
import shutil

import numpy as np

from cadenza.errors import CadenzaError
from cadenza.models.config import ModelConfig
from cadenza.models.hf_config import hf_config_from_model
from cadenza.models.hf_import import INDEX_FILE, TOKENIZER_FILES
from cadenza.models.hf_weights import get_path, hf_shape, to_hf, weight_specs
from cadenza.outputs import atomic_dir, save_safetensors

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def _hf_tensors(config: ModelConfig, params):
    """``[(hf_name, shape, dtype, produce)]`` for every HF tensor, one leaf gathered at a time.

    ``produce()`` returns the tensor as a new C-ordered numpy array (not a view
    that would keep its whole leaf alive); call them in list order.
    """
    from cadenza.models.params import stack_layers

    if "layers" not in params:
        params = stack_layers(params, config.num_layers)
    out = []
    for spec in weight_specs(config):
        leaf = get_path(params, spec.path)
        names = spec.hf_names(config.num_layers)
        shape = hf_shape(spec.layout, leaf.shape[len(spec.stack_shape(config.num_layers)):])
        cache = {}  # one host copy per leaf, shared by its tensors, dropped after the last

        def produce(idx, last, leaf=leaf, layout=spec.layout, cache=cache):
            host = cache.pop("host", None)
            host = np.asarray(leaf) if host is None else host
            if not last:
                cache["host"] = host
            return np.array(to_hf(layout, host[idx]), order="C")

        for k, (idx, name) in enumerate(names):
            out.append((name, shape, leaf.dtype,
                        lambda f=produce, idx=idx, last=k + 1 == len(names): f(idx, last)))
    return out


def _nbytes(tensor) -> int:
    _, shape, dtype, _ = tensor
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _shards(tensors, max_bytes: int):
    shards, size = [[]], 0
    for t in tensors:
        if shards[-1] and size + _nbytes(t) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += _nbytes(t)
    return shards


def _write_shard(path: pathlib.Path, shard) -> int:
    """Write one safetensors file with ``{"format": "pt"}`` metadata (what transformers
    expects); only this shard's tensors are in host memory. Returns its data bytes."""
    arrays = {name: produce() for name, _, _, produce in shard}
    save_safetensors(path, arrays, {"format": "pt"})
    return sum(_nbytes(t) for t in shard)


def save_hf(model, hf_dir, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """Write an HF checkpoint of ``model`` to ``hf_dir`` (which must not hold one already).

    Args:
      model: a cadenza model directory (path), or ``(config, params)`` where
        config is a ModelConfig or an ExperimentConfig and params are in the
        scanned or unscanned layout (jax or numpy arrays, sharded or not).
      hf_dir: output directory.
      max_shard_bytes: safetensors files are split above this size, with a
        ``model.safetensors.index.json``; they are written one at a time, so
        host memory holds one shard (plus the gathered leaf being split).

    The tensors keep the params' dtype. Tokenizer and generation files are
    copied from the model directory's tokenizer/ folder when there is one, with
    the BOS behaviour made cadenza's (:func:`align_bos`).

    Raises:
      CadenzaError: the config uses a feature the family's transformers
        class cannot express, or ``hf_dir`` already holds a checkpoint.
    """
    from cadenza.models.checkpoint import load_model, tokenizer_dir

    tokenizer = None
    if isinstance(model, (str, pathlib.Path)):
        tokenizer = tokenizer_dir(model)
        experiment, params = load_model(model)
        config = experiment.model
    else:
        config, params = model
        config = getattr(config, "model", config)
    hf_config = hf_config_from_model(config)
    out = pathlib.Path(hf_dir)
    if (out / "config.json").exists() or list(out.glob("*.safetensors")):
        raise CadenzaError("an HF checkpoint already exists here", where=str(out),
                           fix="choose a new output directory or delete the old one")
    with atomic_dir(out) as tmp:  # written under a temporary name, renamed when complete
        tmp.mkdir(parents=True)
        shards = _shards(_hf_tensors(config, params), max_shard_bytes)
        if len(shards) == 1:
            _write_shard(tmp / "model.safetensors", shards[0])
        else:
            weight_map, total = {}, 0
            for k, shard in enumerate(shards):
                name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                total += _write_shard(tmp / name, shard)
                weight_map.update({t[0]: name for t in shard})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        if tokenizer is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer / name).is_file():
                    shutil.copyfile(tokenizer / name, tmp / name)
            align_bos(tmp)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return out


def align_bos(hf_dir) -> bool:
    """Make the tokenizer files in ``hf_dir`` add a BOS as cadenza's tokenizer does.

    cadenza puts the BOS token in front of encoded text itself; a ``tokenizer.json``
    whose post-processor does not (e.g. one trained by cadenza) gets a template
    post-processor adding it, and ``tokenizer_config.json`` says ``add_bos_token``,
    so transformers encodes the same text to the same ids. Nothing changes for
    tokenizers without a BOS token or that already add it. Returns whether a file
    was changed.
    """
    import tokenizers
    from tokenizers import processors

    from cadenza.models.tokenizer import load_tokenizer

    out = pathlib.Path(hf_dir)
    if not (out / "tokenizer.json").is_file():
        return False
    try:
        ours = load_tokenizer(out)
    except CadenzaError:  # cadenza cannot encode with it either: nothing to align
        return False
    if ours.bos_id is None:
        return False
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    if tok.encode("a", add_special_tokens=True).ids[:1] == [ours.bos_id]:
        return False
    bos = processors.TemplateProcessing(
        single=f"{ours.bos_token} $A", pair=f"{ours.bos_token} $A {ours.bos_token} $B",
        special_tokens=[(ours.bos_token, ours.bos_id)])
    tok.post_processor = bos if tok.post_processor is None \
        else processors.Sequence([tok.post_processor, bos])
    tok.save(str(out / "tokenizer.json"))
    config_path = out / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        config.update(add_bos_token=True, add_eos_token=False)
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return True
