"""Hugging Face ``config.json`` <-> :class:`~cadenza.models.config.ModelConfig`.

Supported ``model_type`` s: llama, mistral, qwen2, gemma, gemma2. Rope
parameters are read from ``rope_parameters`` (transformers 5) or
``rope_scaling`` + ``rope_theta`` (transformers 4); types default, linear and
llama3. Per-layer sliding windows come from ``layer_types`` when present,
else from each family's rule, and must form one of cadenza's patterns
(none, all, even). Anything cadenza cannot represent is refused with the
field named, never approximated.
"""

import dataclasses

from cadenza.errors import CadenzaError, ConfigError
from cadenza.models.config import ModelConfig, RopeScalingConfig

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM",
                 "gemma2": "Gemma2ForCausalLM"}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_HF_ACTIVATION = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}
_DTYPES = ("float32", "bfloat16", "float16")


def _refuse(what: str, where: str, fix: str):
    raise CadenzaError(what, where=where, fix=fix)


def _rope(hf: dict, where: str) -> tuple[float, RopeScalingConfig]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        distinct = {repr(sorted(v.items())) for v in params.values()}
        if len(distinct) > 1:
            _refuse("per-layer-type rope parameters differ", f"{where}: rope_parameters",
                    "cadenza uses one rope setting for all layers")
        params = next(iter(params.values()))
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        _refuse("partial rotary embeddings are not supported", f"{where}: partial_rotary_factor",
                "cadenza rotates the whole head_dim")
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
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


def _layer_windows(hf: dict, family: str, num_layers: int) -> list[int]:
    window = int(hf.get("sliding_window") or 0)
    if family == "qwen2" and not hf.get("use_sliding_window", False):
        window = 0
    types = hf.get("layer_types")
    if types is not None and family in ("qwen2", "gemma2"):  # the others ignore layer_types
        sliding = [t == "sliding_attention" for t in types]
    elif family == "mistral":
        sliding = [True] * num_layers
    elif family == "gemma2":
        sliding = [i % 2 == 0 for i in range(num_layers)]
    elif family == "qwen2":
        first = int(hf.get("max_window_layers", num_layers))
        sliding = [i >= first for i in range(num_layers)]
    else:
        sliding = [False] * num_layers
    return [window if s else 0 for s in sliding]


def _window_pattern(windows: list[int], where: str) -> tuple[int, str]:
    window = max(windows, default=0)
    if window == 0:
        return 0, "none"
    for pattern in ("all", "even"):
        config = ModelConfig(num_layers=len(windows), sliding_window=window, local_layers=pattern)
        if config.layer_windows() == windows:
            return window, pattern
    _refuse(f"per-layer sliding windows {windows} match no cadenza pattern",
            f"{where}: layer_types / sliding_window",
            "cadenza supports windows on all layers or on even layers (Gemma-2 style)")


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
      CadenzaError: remote code (``auto_map``), an unsupported model type or
        feature, or values cadenza's config rejects.
    """
    notes: list[str] = []
    if "auto_map" in hf:
        _refuse("the config asks for custom code (auto_map); cadenza never runs remote code",
                f"{where}: auto_map", "use a checkpoint of a supported built-in architecture: "
                + ", ".join(FAMILIES))
    family = hf.get("model_type")
    if family not in FAMILIES:
        _refuse(f"model_type {family!r} is not supported", f"{where}: model_type",
                f"supported model types: {', '.join(FAMILIES)}")
    gemma = family in ("gemma", "gemma2")
    if hf.get("mlp_bias"):
        _refuse("MLP biases are not supported", f"{where}: mlp_bias", "use a model without them")
    if family != "qwen2" and hf.get("attention_bias"):
        _refuse("attention biases on all four projections (attention_bias=true) are not "
                "supported", f"{where}: attention_bias",
                "cadenza supports q/k/v biases only (Qwen2 style)")
    act_name = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if gemma and act_name == "gelu":
        act_name = "gelu_pytorch_tanh"
        notes.append("legacy hidden_act='gelu' in a Gemma config means the tanh approximation "
                     "(as transformers does)")
    if act_name not in _ACTIVATIONS:
        _refuse(f"activation {act_name!r} is not supported", f"{where}: hidden_act",
                f"supported: {', '.join(_ACTIVATIONS)}")
    theta, rope_scaling = _rope(hf, where)
    num_layers = int(hf["num_hidden_layers"])
    window, local_layers = _window_pattern(_layer_windows(hf, family, num_layers), where)
    declared = hf.get("dtype") or hf.get("torch_dtype")
    if dtype is None:
        dtype = declared if declared in _DTYPES else "float32"
        if declared not in _DTYPES:
            notes.append(f"declared dtype {declared!r}; using float32")
    num_heads = int(hf["num_attention_heads"])
    try:
        config = ModelConfig(
            family=family, vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            num_layers=num_layers, num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or 0), intermediate_size=int(hf["intermediate_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings") or 2048),
            rope_theta=theta, rope_scaling=rope_scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), norm_plus_one=gemma,
            post_norms=family == "gemma2", activation=_ACTIVATIONS[act_name],
            qkv_bias=family == "qwen2", tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            scale_embeddings=gemma, sliding_window=window, local_layers=local_layers,
            attn_logit_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
            final_logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or 0.0)
            if family == "gemma2" else 0.0,
            bos_token_id=_token_id(hf, "bos_token_id", where, notes),
            eos_token_id=_token_id(hf, "eos_token_id", where, notes),
            pad_token_id=_token_id(hf, "pad_token_id", where, notes),
            dtype=dtype, param_dtype=dtype)
    except KeyError as e:
        raise CadenzaError(f"config.json lacks the required field {e.args[0]!r}", where=where,
                           fix="use the config.json that came with the checkpoint") from None
    except ConfigError as e:
        raise CadenzaError(f"{e.where}: {e.what}", where=where, fix=e.fix) from None
    return config, notes


def hf_config_from_model(config: ModelConfig) -> dict:
    """The ``config.json`` dict transformers needs to build ``config``'s model.

    Raises CadenzaError if the config uses a feature the family's
    transformers class cannot express (checked by converting back).
    """
    hd = config.resolved_head_dim
    rs = config.rope_scaling
    rope = {"rope_type": rs.type, "rope_theta": config.rope_theta}
    if rs.type != "default":
        rope["factor"] = rs.factor
    if rs.type == "llama3":
        rope.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings)
    windows = config.layer_windows()
    hf = {
        "architectures": [ARCHITECTURES[config.family]], "model_type": config.family,
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
    if config.family == "mistral":
        hf["sliding_window"] = config.sliding_window or None
    if config.family in ("gemma2", "qwen2"):
        hf["sliding_window"] = config.sliding_window or None
        hf["layer_types"] = ["sliding_attention" if w else "full_attention" for w in windows]
    if config.family == "qwen2":
        hf.pop("attention_bias")
        hf["use_sliding_window"] = config.sliding_window > 0
        hf["max_window_layers"] = windows.index(config.sliding_window) if any(windows) else 0
    if config.family == "gemma2":
        hf["hidden_activation"] = hf["hidden_act"]
        hf["attn_logit_softcapping"] = config.attn_logit_softcap or None
        hf["final_logit_softcapping"] = config.final_logit_softcap or None
        scalar = config.query_pre_attn_scalar or hd
        hf["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar
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
              "sliding_window", "local_layers", "query_pre_attn_scalar", "head_dim"):
        fields.pop(f)
    if config.rope_scaling.type == "default":
        fields["rope_scaling"] = dataclasses.asdict(RopeScalingConfig())
    fields["head_dim"] = config.resolved_head_dim
    fields["windows"] = config.layer_windows()
    fields["attention_scale"] = config.attention_scale
    return fields
