"""Hugging Face ``config.json`` <-> :class:`~cadenza.models.config.ModelConfig`.

Supported ``model_type`` s: those in :data:`cadenza.models.families.FAMILIES`
(llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, mixtral, qwen2_moe, qwen3_moe,
olmoe). Only the keys each family's transformers class reads are read (e.g.
soft-capping only for Gemma 2/3). Rope parameters are read from
``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta``
(transformers 4); types default, linear and llama3; Gemma 3's separate
sliding-layer base. Per-layer sliding windows come from ``layer_types`` when
the family reads it, else from the family's rule, and must form one of
cadenza's patterns (none, all, even, interleaved). Anything cadenza cannot
represent is refused with the field named, never approximated.
"""

import dataclasses

from cadenza.errors import CadenzaError, ConfigError
from cadenza.models.config import ModelConfig, RopeScalingConfig
from cadenza.models.families import FAMILIES, NAMES, Family
from cadenza.models.hf_quant import parse as parse_hf_quant

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_HF_ACTIVATION = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}
_DTYPES = ("float32", "bfloat16", "float16")


def _refuse(what: str, where: str, fix: str):
    raise CadenzaError(what, where=where, fix=fix)


def _one_rope(params: dict, hf: dict, default_theta: float, where: str
              ) -> tuple[float, RopeScalingConfig]:
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        _refuse("partial rotary embeddings are not supported", f"{where}: partial_rotary_factor",
                "cadenza rotates the whole head_dim")
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or default_theta)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return theta, RopeScalingConfig()
    if rope_type == "linear":
        return theta, RopeScalingConfig(type="linear", factor=float(params["factor"]))
    if rope_type == "llama3":
        return theta, RopeScalingConfig(
            type="llama3", factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    _refuse(f"rope type {rope_type!r} is not supported", f"{where}: rope_parameters",
            "supported rope types: default, linear, llama3")


def _rope(hf: dict, fam: Family, where: str) -> tuple[float, RopeScalingConfig, float]:
    """(rope_theta, rope_scaling, local_rope_theta) of ``hf``."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    default_theta = fam.defaults.get("rope_theta", 10000.0)
    if fam.name == "gemma3_text":  # full_attention: global layers; sliding_attention: local
        full = params.get("full_attention", {} if "sliding_attention" in params else params)
        theta, scaling = _one_rope(full, hf, default_theta, where)
        local = params.get("sliding_attention") or {
            "rope_theta": hf.get("rope_local_base_freq", fam.defaults["local_rope_theta"])}
        local_theta, local_scaling = _one_rope(local, {}, fam.defaults["local_rope_theta"],
                                               where)
        if local_scaling.type != "default":
            _refuse("scaled rope on sliding-window layers is not supported",
                    f"{where}: rope_parameters.sliding_attention",
                    "cadenza's local layers use an unscaled base (as Gemma 3 ships)")
        return theta, scaling, local_theta
    if params and all(isinstance(v, dict) for v in params.values()):
        distinct = {repr(sorted(v.items())) for v in params.values()}
        if len(distinct) > 1:
            _refuse("per-layer-type rope parameters differ", f"{where}: rope_parameters",
                    "cadenza uses one rope setting for all layers of this family")
        params = next(iter(params.values()))
    return (*_one_rope(params, hf, default_theta, where), 0.0)


def _read(hf: dict, fam: Family, key: str, default=None):
    """``hf[key]`` if the family's class reads it (else its default, or ``default``)."""
    if key not in fam.reads:
        return default
    value = hf.get(key)
    return fam.defaults.get(key, default) if value is None and key not in hf else value


def _layer_windows(hf: dict, fam: Family, num_layers: int) -> list[int]:
    window = int(_read(hf, fam, "sliding_window") or 0)
    if "use_sliding_window" in fam.reads and not hf.get("use_sliding_window", False):
        window = 0
    types = _read(hf, fam, "layer_types")
    if fam.window_rule == "all":
        sliding = [True] * num_layers
    elif fam.window_rule != "layer_types":
        sliding = [False] * num_layers
    elif types is not None:
        sliding = [t == "sliding_attention" for t in types]
    elif fam.default_layer_types == "even":
        sliding = [i % 2 == 0 for i in range(num_layers)]
    elif fam.default_layer_types == "every_6th_global":
        n = int(_read(hf, fam, "sliding_window_pattern"))
        sliding = [bool((i + 1) % n) for i in range(num_layers)]
    elif fam.default_layer_types == "odd_below_max":
        first = int(hf.get("max_window_layers", num_layers))
        sliding = [bool((i + 1) % 2) and i < first for i in range(num_layers)]
    else:  # qwen
        first = int(hf.get("max_window_layers", num_layers))
        sliding = [i >= first for i in range(num_layers)]
    return [window if s else 0 for s in sliding]


def _window_pattern(windows: list[int], where: str) -> tuple[int, str, int]:
    """(sliding_window, local_layers, global_layer_interval) reproducing ``windows``."""
    window = max(windows, default=0)
    if window == 0:
        return 0, "none", 0
    interval = windows.index(0) + 1 if 0 in windows else 0
    for pattern, n in (("all", 0), ("even", 0), ("interleaved", interval)):
        if pattern == "interleaved" and n < 2:
            continue
        config = ModelConfig(num_layers=len(windows), sliding_window=window,
                             local_layers=pattern, global_layer_interval=n)
        if config.layer_windows() == windows:
            return window, pattern, n
    _refuse(f"per-layer sliding windows {windows} match no cadenza pattern",
            f"{where}: layer_types / sliding_window",
            "cadenza supports windows on all layers, on even layers (Gemma 2) or on all but "
            "every n-th layer (Gemma 3)")


def _experts(hf: dict, fam: Family, where: str, notes: list[str]) -> dict:
    """The MoE fields of ModelConfig from ``hf`` (empty for dense families)."""
    if not fam.moe:
        return {}
    if int(_read(hf, fam, "decoder_sparse_step", 1) or 1) != 1 or _read(
            hf, fam, "mlp_only_layers", []):
        _refuse("dense layers between MoE layers are not supported",
                f"{where}: decoder_sparse_step / mlp_only_layers",
                "cadenza builds models whose every layer is MoE (decoder_sparse_step=1, "
                "mlp_only_layers=[])")
    if float(hf.get("router_jitter_noise") or 0.0):
        notes.append(f"router_jitter_noise={hf['router_jitter_noise']} (training-time noise on "
                     "the router input) is not applied by cadenza")
    # transformers 5 saves Qwen3-MoE's count as num_local_experts, older ones as num_experts
    count = hf.get("num_local_experts") or hf["num_experts"]
    fields = {"num_experts": int(count), "num_experts_per_tok": int(hf["num_experts_per_tok"]),
              "moe_intermediate_size": int(_read(hf, fam, "moe_intermediate_size", 0) or 0),
              "router_aux_loss_coef": float(_read(hf, fam, "router_aux_loss_coef", 0.0) or 0.0)}
    if "norm_topk_prob" in fam.reads:
        fields["norm_topk_prob"] = bool(_read(hf, fam, "norm_topk_prob", False))
    if "shared_expert_intermediate_size" in fam.reads:
        fields["shared_expert_size"] = int(_read(hf, fam, "shared_expert_intermediate_size"))
    return fields


def _token_id(hf: dict, name: str, where: str, notes: list[str]):
    value = hf.get(name)
    if isinstance(value, list):
        if not value:
            return None
        if len(value) > 1:
            notes.append(f"{name} is a list {value}; cadenza uses the first, {value[0]} "
                         "(stop on the others with decode stop settings)")
        value = value[0]
    return value


def model_config_from_hf(hf: dict, *, dtype: str | None = None, where: str = "config.json"
                         ) -> tuple[ModelConfig, list[str]]:
    """A :class:`ModelConfig` for a Hugging Face ``config.json`` dict.

    Args:
      hf: the parsed config.json.
      dtype: param and compute dtype; default: the checkpoint's declared
        ``dtype``/``torch_dtype`` when it is float32/bfloat16/float16, else float32.
      where: how errors name the file.

    Returns:
      (config, notes): notes are human-readable remarks about choices made
      (e.g. which of several eos ids was kept).

    Raises:
      CadenzaError: remote code (``auto_map``), a quantized checkpoint whose
        ``quantization_config`` cadenza cannot map (see :mod:`cadenza.models.hf_quant`;
        an accepted one sets ``weight_quant`` and ``weight_quant_group``), an unsupported
        model type or feature, or values cadenza's config rejects.
    """
    notes: list[str] = []
    if "auto_map" in hf:
        _refuse("the config asks for custom code (auto_map); cadenza never runs remote code",
                f"{where}: auto_map", "use a checkpoint of a supported built-in architecture: "
                + ", ".join(NAMES))
    quant = None
    if hf.get("quantization_config") is not None:
        quant = parse_hf_quant(hf["quantization_config"], where)
    name = hf.get("model_type")
    if name not in FAMILIES:
        _refuse(f"model_type {name!r} is not supported", f"{where}: model_type",
                f"supported model types: {', '.join(NAMES)}")
    fam = FAMILIES[name]
    gemma = name.startswith("gemma")
    if hf.get("mlp_bias"):
        _refuse("MLP biases are not supported", f"{where}: mlp_bias", "use a model without them")
    if name != "qwen2" and hf.get("attention_bias"):
        _refuse("attention biases on all four projections (attention_bias=true) are not "
                "supported", f"{where}: attention_bias",
                "cadenza supports q/k/v biases only (Qwen2 style)")
    if _read(hf, fam, "clip_qkv") is not None:
        _refuse("clipping of q/k/v (clip_qkv) is not supported", f"{where}: clip_qkv",
                "use a model without clip_qkv")
    if hf.get("use_bidirectional_attention"):
        _refuse("bidirectional attention is not supported", f"{where}: "
                "use_bidirectional_attention", "cadenza builds causal decoders")
    act_name = hf.get("hidden_activation") or hf.get("hidden_act") or (
        "gelu_pytorch_tanh" if gemma else "silu")
    if gemma and act_name == "gelu":
        act_name = "gelu_pytorch_tanh"
        notes.append("legacy hidden_act='gelu' in a Gemma config means the tanh approximation "
                     "(as transformers does)")
    if act_name not in _ACTIVATIONS:
        _refuse(f"activation {act_name!r} is not supported", f"{where}: hidden_act",
                f"supported: {', '.join(_ACTIVATIONS)}")
    theta, rope_scaling, local_theta = _rope(hf, fam, where)
    num_layers = int(hf["num_hidden_layers"])
    window, local_layers, interval = _window_pattern(_layer_windows(hf, fam, num_layers), where)
    declared = hf.get("dtype") or hf.get("torch_dtype")
    if dtype is None:
        dtype = declared if declared in _DTYPES else "float32"
        if declared not in _DTYPES:
            notes.append(f"declared dtype {declared!r}; using float32")
    num_heads = int(hf["num_attention_heads"])
    try:
        config = ModelConfig(
            **fam.switches, family=name, vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]), num_layers=num_layers, num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or 0), intermediate_size=int(hf["intermediate_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings") or 2048),
            rope_theta=theta, rope_scaling=rope_scaling, local_rope_theta=local_theta,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), activation=_ACTIVATIONS[act_name],
            tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            sliding_window=window, local_layers=local_layers, global_layer_interval=interval,
            attn_logit_softcap=float(_read(hf, fam, "attn_logit_softcapping") or 0.0),
            final_logit_softcap=float(_read(hf, fam, "final_logit_softcapping") or 0.0),
            query_pre_attn_scalar=float(_read(hf, fam, "query_pre_attn_scalar") or 0.0),
            bos_token_id=_token_id(hf, "bos_token_id", where, notes),
            eos_token_id=_token_id(hf, "eos_token_id", where, notes),
            pad_token_id=_token_id(hf, "pad_token_id", where, notes),
            dtype=dtype, param_dtype=dtype, **_experts(hf, fam, where, notes),
            **({"weight_quant": quant.scheme, "weight_quant_group": quant.group or 128}
               if quant else {}),
            **({"qkv_bias": bool(_read(hf, fam, "qkv_bias"))} if "qkv_bias" in fam.reads
               else {}))
    except KeyError as e:
        raise CadenzaError(f"config.json lacks the required field {e.args[0]!r}", where=where,
                           fix="use the config.json that came with the checkpoint") from None
    except ConfigError as e:
        raise CadenzaError(f"{e.where}: {e.what}", where=where, fix=e.fix) from None
    ignored = sorted(k for k in ("attn_logit_softcapping", "final_logit_softcapping")
                     if hf.get(k) and k not in fam.reads)
    if ignored:
        notes.append(f"{', '.join(ignored)} set but ignored: transformers' {fam.architecture} "
                     "does not apply them (neither does cadenza)")
    return config, notes


def hf_config_from_model(config: ModelConfig) -> dict:
    """The ``config.json`` dict transformers needs to build ``config``'s model.

    Raises CadenzaError if the config uses a feature the family's
    transformers class cannot express (checked by converting back), or is quantised.
    """
    if config.weight_quant != "none":
        _refuse(f"the model is quantised ({config.weight_quant}); Hugging Face export writes "
                "float weights", "model.weight_quant",
                "export the float model directory it was quantised from")
    hd = config.resolved_head_dim
    rs = config.rope_scaling
    rope = {"rope_type": rs.type, "rope_theta": config.rope_theta}
    if rs.type != "default":
        rope["factor"] = rs.factor
    if rs.type == "llama3":
        rope.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings)
    windows = config.layer_windows()
    fam = FAMILIES[config.family]
    hf = {
        "architectures": [fam.architecture], "model_type": config.family,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": hd, "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_eps, "rope_parameters": rope,
        "hidden_act": _HF_ACTIVATION[config.activation],
        "tie_word_embeddings": config.tie_embeddings, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        "dtype": config.param_dtype, "attention_bias": False, "mlp_bias": False,
    }
    if config.family == "qwen2":
        hf.pop("attention_bias")
    if config.family == "gemma3_text":
        local = ({"rope_type": "default", "rope_theta": config.local_rope_theta}
                 if config.local_rope_theta else dict(rope))
        hf["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
    if fam.window_rule != "none":
        hf["sliding_window"] = config.sliding_window or None
    if fam.window_rule == "layer_types":
        hf["layer_types"] = ["sliding_attention" if w else "full_attention" for w in windows]
    if "use_sliding_window" in fam.reads:
        hf["use_sliding_window"] = config.sliding_window > 0
        hf["max_window_layers"] = windows.index(config.sliding_window) if any(windows) else 0
    if config.family.startswith("gemma"):
        hf["hidden_activation"] = hf["hidden_act"]
    if "attn_logit_softcapping" in fam.reads:
        hf["attn_logit_softcapping"] = config.attn_logit_softcap or None
        hf["final_logit_softcapping"] = config.final_logit_softcap or None
    if "query_pre_attn_scalar" in fam.reads:
        scalar = config.query_pre_attn_scalar or hd
        hf["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar
    if fam.moe:
        hf["num_local_experts" if config.family == "mixtral" else "num_experts"] = \
            config.num_experts
        hf["num_experts_per_tok"] = config.num_experts_per_tok
        hf["router_aux_loss_coef"] = config.router_aux_loss_coef
        if "moe_intermediate_size" in fam.reads:
            hf["moe_intermediate_size"] = config.expert_size
            hf["decoder_sparse_step"] = 1
            hf["mlp_only_layers"] = []
        if "norm_topk_prob" in fam.reads:
            hf["norm_topk_prob"] = config.norm_topk_prob
        if "shared_expert_intermediate_size" in fam.reads:
            hf["shared_expert_intermediate_size"] = config.shared_expert_size
    if "qkv_bias" in fam.reads:
        hf["qkv_bias"] = config.qkv_bias
    back, _ = model_config_from_hf(hf, dtype=config.param_dtype, where="exported config.json")
    lost = [f for f, v in _semantics(config).items() if _semantics(back)[f] != v]
    if lost:
        raise CadenzaError(
            f"the {config.family} architecture in transformers cannot express this config "
            f"(fields that would change: {', '.join(lost)})", where="model config",
            fix="export a config that matches the family's published architecture")
    return hf


def _semantics(config: ModelConfig) -> dict:
    """The fields that determine the model's function (what an export must preserve)."""
    fields = dataclasses.asdict(config)
    for f in ("preset", "dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl",
              "sliding_window", "local_layers", "global_layer_interval", "query_pre_attn_scalar",
              "head_dim", "moe_intermediate_size", "router_aux_loss_coef", "router_z_loss_coef"):
        fields.pop(f)
    if config.weight_quant == "none":  # targets and group mean nothing on a float model
        fields.pop("weight_quant_targets")
        fields.pop("weight_quant_group")
    if config.rope_scaling.type == "default":
        fields["rope_scaling"] = dataclasses.asdict(RopeScalingConfig())
    fields["head_dim"] = config.resolved_head_dim
    fields["windows"] = config.layer_windows()
    fields["attention_scale"] = config.attention_scale
    fields["expert_size"] = config.expert_size if config.is_moe else 0
    if not any(fields["windows"]):
        fields["local_rope_theta"] = 0.0
    return fields
