"""Adapter artifacts: cadenza adapter directories and Hugging Face peft LoRA adapters.

A cadenza adapter directory holds only the trainable tree::

    DIR/config.yaml    the ExperimentConfig the adapters were made for (model + peft)
    DIR/adapters/      the trainable tree, an orbax StandardCheckpointer checkpoint

Loading checks the adapters against the base model *before* restoring or
compiling anything: every target must exist in the base and every stored
array must have the shape the base implies.

Hugging Face peft format (LoRA and DoRA): ``adapter_config.json`` and
``adapter_model.safetensors`` with keys
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` [r, in],
``...lora_B.weight`` [out, r], ``...lora_magnitude_vector`` [out] (DoRA);
``self_attn`` for q/k/v/o_proj, ``mlp`` for gate/up/down_proj,
``base_model.model.lm_head`` for the LM head. Multi-axis kernels are
flattened in C order ([heads, head_dim] -> heads * head_dim), matching how
cadenza's HF conversion lays out q/k/v/o.
"""

import json
import pathlib
import re

import jax
import numpy as np
import orbax.checkpoint as ocp

from cadenza.errors import CadenzaError
from cadenza.outputs import atomic_dir, require_complete, save_safetensors
from cadenza.train.peft.model import PeftModel, build
from cadenza.train.peft.sites import get_path, projection_sites, set_path
from cadenza.train.peft_config import PeftConfig

HF_PREFIX = "base_model.model."
_HF_KEY = re.compile(r"base_model\.model\.(?:model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)|"
                     r"(lm_head))\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
_HF_BLOCK = {"attn": "self_attn", "mlp": "mlp"}
_UNSUPPORTED = {"rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "fan_in_fan_out": False,
                "modules_to_save": None, "layers_pattern": None, "lora_bias": False,
                "layer_replication": None, "trainable_token_indices": None}


def save_adapters(directory, config, trainable) -> pathlib.Path:
    """Write the adapters alone: ``config`` (ExperimentConfig) and ``trainable``."""
    from cadenza.config import to_yaml

    d = pathlib.Path(directory).absolute()
    if config.peft.method == "none":
        raise CadenzaError("peft.method is 'none': there are no adapters to save",
                           where="peft.method", fix="save full models with save_model")
    with atomic_dir(d) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "config.yaml").write_text(to_yaml(config))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "adapters", trainable)
    return d


def _shapes_match(pm: PeftModel, stored, where: str):
    """Fail unless the stored shape tree equals what ``pm`` expects (base-model mismatch)."""
    want = pm.abstract_trainable()
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    flat_got = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
    name = jax.tree_util.keystr
    missing = sorted(name(k) for k in flat_want.keys() - flat_got.keys())
    extra = sorted(name(k) for k in flat_got.keys() - flat_want.keys())
    if missing or extra:
        raise CadenzaError(f"adapters do not fit this base: missing {missing[:4]}, "
                           f"unexpected {extra[:4]}", where=where,
                           fix="use adapters trained for this base model")
    for k, w in flat_want.items():
        if tuple(flat_got[k].shape) != tuple(w.shape):
            raise CadenzaError(f"adapter {name(k)} has shape {tuple(flat_got[k].shape)} but this "
                               f"base needs {tuple(w.shape)} (adapters for another base?)",
                               where=where, fix="use adapters trained for this base model")


def load_adapters(directory, base_config, *, mesh=None, rules=None):
    """Read an adapter directory for the base ``base_config`` (an ExperimentConfig).

    Returns ``(peft_model, trainable)``; with a ``mesh`` the arrays are
    restored into their shards. Fails before restoring if a target is not
    in the base or a shape differs.
    """
    from cadenza.config import load_config

    d = pathlib.Path(directory).absolute()
    if not (d / "config.yaml").is_file() or not (d / "adapters").is_dir():
        raise CadenzaError("not a cadenza adapter directory (needs config.yaml and adapters/)",
                           where=str(d), fix="pass a directory written by save_adapters or "
                                             "'cadenza convert peft-import'")
    require_complete(d, "adapter directory")
    peft_config = load_config(d / "config.yaml").peft
    pm = build(base_config.model, peft_config)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(d / "adapters")
        meta = getattr(meta, "item_metadata", meta)
        _shapes_match(pm, meta, str(d))
        target = pm.abstract_trainable()
        if mesh is not None:
            shardings, _ = pm.shardings(mesh, rules or base_config.mesh.rules())
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  target, shardings)
        trainable = ckptr.restore(d / "adapters", target)
    return pm, trainable


def _hf_module(site, layer: int | None) -> str:
    if site.path == ("lm_head",):
        return "lm_head"
    block, proj = site.path[-2], site.path[-1]
    if layer is None:
        layer = int(site.path[0].split("_")[1])
    return f"model.layers.{layer}.{_HF_BLOCK[block]}.{proj}"


def peft_export(directory, pm: PeftModel, trainable) -> pathlib.Path:
    """Write ``trainable`` as a Hugging Face peft LoRA/DoRA adapter (float32 safetensors)."""

    if pm.method not in ("lora", "lora_plus", "dora", "qlora"):
        raise CadenzaError(f"method {pm.method!r} cannot be exported to peft's LoRA format",
                           where="peft.method", fix="export lora, lora_plus, dora or qlora")
    experts = [s.name for s in pm.sites if s.experts]
    if experts:
        raise CadenzaError(f"adapters on expert projections ({', '.join(experts)}) have no "
                           f"peft LoRA format here (peft adapts fused expert weights through "
                           f"target_parameters, which this export does not write)",
                           where="peft.targets",
                           fix="keep the cadenza adapter directory, or merge the adapters "
                               "into the base and export the merged model")
    pc = pm.peft_config
    tensors, modules = {}, set()
    for s in pm.sites:
        ad = jax.device_get(get_path(trainable["peft"], s.path))
        layers = range(s.layers) if s.layers else [None]
        for i in layers:
            pick = (lambda x, i=i: x[i]) if i is not None else (lambda x: x)
            name = HF_PREFIX + _hf_module(s, i)
            modules.add(name[len(HF_PREFIX):])
            a, b = np.asarray(pick(ad["lora_a"]), np.float32), np.asarray(pick(ad["lora_b"]),
                                                                           np.float32)
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, pc.rank).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(pc.rank, -1).T)
            if "dora_magnitude" in ad:
                tensors[f"{name}.lora_magnitude_vector"] = np.asarray(
                    pick(ad["dora_magnitude"]), np.float32).reshape(-1)
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    n_layers = pm.model_config.num_layers
    uniform = all(f"model.layers.{i}.{blk}.{p}" in modules or p == "lm_head"
                  for p in short for i in range(n_layers)
                  for blk in [("self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj")
                               else "mlp")])
    targets = short if uniform else "|".join(re.escape(m) for m in sorted(modules))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": pc.rank,
           "lora_alpha": pc.alpha, "lora_dropout": pc.dropout, "use_rslora": pc.rslora,
           "use_dora": pm.method == "dora", "target_modules": targets, "bias": "none",
           "fan_in_fan_out": False, "init_lora_weights": True, "base_model_name_or_path": None,
           "inference_mode": True, "modules_to_save": None, "rank_pattern": {},
           "alpha_pattern": {}}
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    save_safetensors(d / "adapter_model.safetensors", tensors)
    return d


_HF_BASE_COPY = re.compile(r"base_model\.model\.(lm_head|model\.embed_tokens)\.base_layer\.weight")


def _check_base_copy(key: str, value, base_config, base_params, where: str) -> None:
    """peft saves the base weight of a targeted ``lm_head`` / ``embed_tokens`` next to the
    adapter (``save_embedding_layers``); it must be this base's weight (same shape and,
    when ``base_params`` are given, the same values)."""
    model = base_config.model
    head = _HF_BASE_COPY.fullmatch(key).group(1) == "lm_head" and not model.tie_embeddings
    want = (model.vocab_size, model.hidden_size)
    if tuple(value.shape) != want:
        raise CadenzaError(f"{key} has shape {tuple(value.shape)}, this base has {want}",
                           where=where, fix="use adapters made for this base model")
    if base_params is not None:
        base = (np.asarray(base_params["lm_head"]["kernel"], np.float32).T if head
                else np.asarray(base_params["embed"]["embedding"], np.float32))
        if not np.allclose(np.asarray(value, np.float32), base, rtol=1e-2, atol=1e-3):
            raise CadenzaError(f"{key} (the base weight peft saved with the adapter) differs "
                               "from this base model's", where=where,
                               fix="use the base model the adapter was trained on")


def peft_import(directory, base_config, base_params=None):
    """Read a Hugging Face peft LoRA/DoRA adapter for the base ``base_config``.

    Returns ``(peft_model, trainable)`` in cadenza's layout. Fails clearly on
    other peft types, options cadenza does not implement, modules absent
    from the base, layer subsets under ``scan_layers`` and shape mismatches.
    A copy of the base's ``lm_head`` / ``embed_tokens`` weight that peft saves with
    adapters targeting them is checked against ``base_params`` (when given; else its
    shape only) and not imported (cadenza keeps the base weights with the base).
    """
    from safetensors.numpy import load_file

    d = pathlib.Path(directory)
    cfg_path, w_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise CadenzaError("not a peft adapter (needs adapter_config.json and "
                           "adapter_model.safetensors)", where=str(d),
                           fix="pass the folder written by peft's save_pretrained")
    hf = json.loads(cfg_path.read_text())
    if hf.get("peft_type") != "LORA":
        raise CadenzaError(f"peft_type {hf.get('peft_type')!r} is not supported",
                           where=str(cfg_path), fix="import LoRA (or DoRA) adapters")
    for key, default in _UNSUPPORTED.items():
        if hf.get(key, default) not in (default, None, {}, False, "none"):
            raise CadenzaError(f"peft option {key}={hf[key]!r} is not supported",
                               where=str(cfg_path), fix=f"use adapters with {key}={default!r}")
    tensors = load_file(str(w_path))
    model_cfg = base_config.model
    sites = {s.name: s for s in projection_sites(model_cfg)}
    found: dict[str, dict] = {}
    for key, value in tensors.items():
        if _HF_BASE_COPY.fullmatch(key):
            _check_base_copy(key, value, base_config, base_params, str(w_path))
            continue
        m = _HF_KEY.fullmatch(key)
        if not m:
            raise CadenzaError(f"unrecognised adapter tensor {key!r}", where=str(w_path),
                               fix="import LoRA adapters of Llama-family causal LMs")
        layer, block, proj, head, kind = m.groups()
        if head:
            name = "lm_head"
        else:
            blk = {v: k for k, v in _HF_BLOCK.items()}[block]
            name = (f"layers.{blk}.{proj}" if model_cfg.scan_layers
                    else f"layer_{layer}.{blk}.{proj}")
        if name not in sites or (layer is not None and int(layer) >= model_cfg.num_layers):
            raise CadenzaError(f"adapter targets {key.rsplit('.', 2)[0]!r}, which the base "
                               "model does not have", where=str(w_path),
                               fix="use adapters made for this base model")
        found.setdefault(name, {}).setdefault(kind, {})[None if layer is None else int(layer)] \
            = value
    r = int(hf["r"])
    use_dora = bool(hf.get("use_dora", False))
    peft_config = PeftConfig(
        method="dora" if use_dora else "lora", rank=r, alpha=float(hf["lora_alpha"]),
        dropout=float(hf.get("lora_dropout", 0.0)), rslora=bool(hf.get("use_rslora", False)),
        targets="|".join(re.escape(n) for n in sorted(found)))
    pm = build(model_cfg, peft_config)
    trainable: dict = {}
    for s in pm.sites:
        per_kind = found[s.name]
        layers = list(range(s.layers)) if s.layers else [None if s.path == ("lm_head",)
                                                         else int(s.path[0].split("_")[1])]
        for kind, leaf in (("lora_A.weight", "lora_a"), ("lora_B.weight", "lora_b"),
                           ("lora_magnitude_vector", "dora_magnitude")):
            if leaf == "dora_magnitude" and not use_dora:
                continue
            got = per_kind.get(kind, {})
            if sorted(got, key=str) != sorted(layers, key=str):
                raise CadenzaError(f"{s.name}: {kind} present for layers {sorted(got, key=str)}, "
                                   f"need {layers}", where=str(w_path),
                                   fix="with scan_layers every layer needs the adapter; "
                                       "set model.scan_layers=false for layer subsets")
            want = {"lora_a": s.in_shape + (r,), "lora_b": (r,) + s.out_shape,
                    "dora_magnitude": s.out_shape}[leaf]
            arrays = []
            for i in layers:
                x = np.asarray(got[i], np.float32)
                x = x.T if x.ndim == 2 else x
                if x.size != np.prod(want) or (leaf != "dora_magnitude" and
                                               x.shape[-1 if leaf == "lora_a" else 0] != r):
                    raise CadenzaError(f"{s.name} {kind} has shape {got[i].shape}, this base "
                                       f"needs {want} flattened (adapter for another base?)",
                                       where=str(w_path), fix="use adapters for this base model")
                arrays.append(x.reshape(want))
            set_path(trainable, ("peft",) + s.path + (leaf,),
                     np.stack(arrays) if s.layers else arrays[0])
    return pm, jax.tree.map(jax.numpy.asarray, trainable)
