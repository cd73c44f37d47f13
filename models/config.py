"""The model config: one frozen dataclass covering every family in
:mod:`cadenza.models.families` (Llama, Mistral, Qwen2/3, Gemma 1/2/3, and the
mixture-of-experts Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE).

A family is a bundle of switches (norm style, activation, biases, tying,
soft-capping, sliding windows, q/k norms, experts); presets under
``configs/models/`` set them to the published values. Fields mirror Hugging
Face ``config.json`` names where one exists, so conversion is a rename.
"""

import dataclasses
import re
from typing import Optional

from cadenza.errors import ConfigError
from cadenza.models.families import FAMILIES as FAMILY_TABLE
from cadenza.models.families import MOE_FAMILIES
from cadenza.models.families import NAMES as FAMILIES
from cadenza.validation import check_choice, check_range, require

ACTIVATIONS = ("silu", "gelu_tanh")
ROPE_TYPES = ("default", "linear", "llama3")
LOCAL_LAYER_PATTERNS = ("none", "all", "even", "interleaved")
QK_NORMS = ("none", "head", "full")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn_out")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "pallas", "cudnn")  # = pallas_kernels.attention.IMPLEMENTATIONS
WEIGHT_QUANT = ("none", "int8", "int4", "nf4")  # = models.quant.WEIGHT_SCHEMES
# every projection but the output head (as Hugging Face / vLLM quantisers leave lm_head float)
DEFAULT_QUANT_TARGETS = r"(?!lm_head$).*"
# The family switches and their value when neither the config nor the family sets them.
SWITCH_DEFAULTS = {"norm_plus_one": False, "post_norms": False, "qkv_bias": False,
                   "scale_embeddings": False, "qk_norm": "none", "norm_topk_prob": False}


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE frequency scaling.

    ``default``: none. ``linear``: positions divided by ``factor``.
    ``llama3``: the Llama 3.1 wavelength-dependent rescale using ``factor``,
    ``low_freq_factor``, ``high_freq_factor`` and
    ``original_max_position_embeddings``.
    """

    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        s = "model.rope_scaling"
        check_choice(s, "type", self.type, ROPE_TYPES)
        check_range(s, "factor", self.factor, low=0.0, low_inclusive=False)
        check_range(s, "low_freq_factor", self.low_freq_factor, low=0.0, low_inclusive=False)
        check_range(s, "high_freq_factor", self.high_freq_factor, low=self.low_freq_factor,
                    low_inclusive=False)
        check_range(s, "original_max_position_embeddings",
                    self.original_max_position_embeddings, low=1)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and family switches of a decoder-only transformer.

    Family switches (``norm_plus_one``, ``post_norms``, ``qkv_bias``,
    ``scale_embeddings``, ``qk_norm``, ``norm_topk_prob``): None (the default)
    takes the family's value (see :mod:`cadenza.models.families`; e.g.
    ``family=gemma`` alone gives Gemma's ``norm_plus_one=True``); a switch the
    family fixes may only be set to that value (a ConfigError names the field
    otherwise); the others (e.g. Qwen2-MoE's ``qkv_bias``) default to the
    family's transformers default, else to :data:`SWITCH_DEFAULTS`.

    ``head_dim`` defaults to ``hidden_size // num_heads`` when left at 0.
    ``sliding_window`` applies to the layers chosen by ``local_layers``:
    ``all`` (Mistral), ``even`` (Gemma-2: layers 0, 2, 4, ... are local),
    ``interleaved`` (Gemma 3: every ``global_layer_interval``-th layer is global,
    the others local) or ``none``. ``local_rope_theta`` > 0 gives local layers
    their own RoPE base (unscaled; Gemma 3); 0 uses ``rope_theta`` and
    ``rope_scaling`` everywhere. ``qk_norm``: RMSNorm of queries and keys before
    RoPE, per head (``head``: Qwen3, Gemma 3) or over all heads together
    (``full``: OLMoE).

    Mixture of experts (``num_experts`` > 0, MoE families only): every layer's
    MLP is ``num_experts`` experts of width ``moe_intermediate_size`` (0: the
    ``intermediate_size``); each token goes to its ``num_experts_per_tok``
    highest-probability experts, weighted by their softmax probabilities
    (renormalised over the chosen ones when ``norm_topk_prob``).
``shared_expert_size`` > 0 adds Qwen2-MoE's shared expert: a gated MLP of that
width every token goes through, scaled by ``sigmoid(shared_expert_gate(x))``.
    ``router_aux_loss_coef`` and ``router_z_loss_coef`` weight the
    load-balancing and router z-loss in training (both are always reported).

    ``attn_logit_softcap`` / ``final_logit_softcap`` of 0 disable soft-capping.
    ``query_pre_attn_scalar`` of 0 scales scores by ``head_dim ** -0.5``;
    otherwise by ``query_pre_attn_scalar ** -0.5``.

    ``weight_quant`` (``none``, ``int8``, ``int4``, ``nf4``): the params hold the
    projections matching ``weight_quant_targets`` (``re.fullmatch`` on module paths)
    in that weight-only format (:mod:`cadenza.models.quant`; int4 groups of
    ``weight_quant_group`` inputs). Set by ``cadenza convert quantize`` and
    ``cadenza generate --quantize``; models are trained in float. On a float model the
    targets mean nothing: quantising it takes the given targets or
    :data:`DEFAULT_QUANT_TARGETS` (every projection but ``lm_head``).
    """

    family: str = "llama"
    preset: Optional[str] = None
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0
    intermediate_size: int = 256
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = dataclasses.field(default_factory=RopeScalingConfig)
    norm_eps: float = 1e-5
    norm_plus_one: Optional[bool] = None
    post_norms: Optional[bool] = None
    activation: str = "silu"
    qkv_bias: Optional[bool] = None
    tie_embeddings: bool = False
    scale_embeddings: Optional[bool] = None
    sliding_window: int = 0
    local_layers: str = "none"
    attn_logit_softcap: float = 0.0
    final_logit_softcap: float = 0.0
    query_pre_attn_scalar: float = 0.0
    global_layer_interval: int = 0
    local_rope_theta: float = 0.0
    qk_norm: Optional[str] = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: Optional[bool] = None
    shared_expert_size: int = 0
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = 0
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"
    weight_quant: str = "none"
    weight_quant_targets: str = DEFAULT_QUANT_TARGETS
    weight_quant_group: int = 128

    def __post_init__(self):
        s = "model"
        check_choice(s, "family", self.family, FAMILIES)
        self._resolve_switches()
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_position_embeddings"):
            check_range(s, name, getattr(self, name), low=1)
        check_range(s, "head_dim", self.head_dim, low=0)
        require(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads",
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}",
                "set num_kv_heads to a divisor of num_heads (grouped-query attention)")
        require(self.head_dim > 0 or self.hidden_size % self.num_heads == 0, "model.head_dim",
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}",
                "set head_dim explicitly or choose num_heads dividing hidden_size")
        require(self.resolved_head_dim % 2 == 0, "model.head_dim",
                f"head_dim={self.resolved_head_dim} is odd; rotary embeddings need an even size",
                "choose an even head_dim")
        check_range(s, "rope_theta", self.rope_theta, low=0.0, low_inclusive=False)
        check_range(s, "norm_eps", self.norm_eps, low=0.0, low_inclusive=False)
        check_choice(s, "activation", self.activation, ACTIVATIONS)
        check_choice(s, "local_layers", self.local_layers, LOCAL_LAYER_PATTERNS)
        check_range(s, "sliding_window", self.sliding_window, low=0)
        require(self.local_layers == "none" or self.sliding_window > 0, "model.sliding_window",
                f"local_layers={self.local_layers!r} needs a sliding_window > 0",
                "set sliding_window (e.g. 4096) or local_layers='none'")
        require(self.local_layers != "interleaved" or self.global_layer_interval >= 2,
                "model.global_layer_interval",
                f"local_layers='interleaved' needs global_layer_interval >= 2, got "
                f"{self.global_layer_interval}", "set it (Gemma 3: 6)")
        check_choice(s, "qk_norm", self.qk_norm, QK_NORMS)
        self._check_experts()
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar",
                     "local_rope_theta", "router_aux_loss_coef", "router_z_loss_coef"):
            check_range(s, name, getattr(self, name), low=0.0)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            check_range(s, name, getattr(self, name), low=0, high=self.vocab_size - 1,
                        optional=True)
        check_choice(s, "dtype", self.dtype, DTYPES)
        check_choice(s, "param_dtype", self.param_dtype, DTYPES)
        check_choice(s, "remat_policy", self.remat_policy, REMAT_POLICIES)
        check_choice(s, "attention_impl", self.attention_impl, ATTENTION_IMPLS)
        check_choice(s, "weight_quant", self.weight_quant, WEIGHT_QUANT)
        check_range(s, "weight_quant_group", self.weight_quant_group, low=2)
        try:
            re.compile(self.weight_quant_targets)
        except re.error as e:
            raise ConfigError(f"not a regex: {self.weight_quant_targets!r} ({e})",
                              where="model.weight_quant_targets",
                              fix="a Python regex over module paths, e.g. '.*_proj'") from None

    def _resolve_switches(self):
        fam = FAMILY_TABLE[self.family]
        for name, default in SWITCH_DEFAULTS.items():
            value, fixed = getattr(self, name), fam.switches.get(name)
            if value is None:
                value = fixed if fixed is not None else fam.defaults.get(name, default)
                object.__setattr__(self, name, value)
            elif fixed is not None and value != fixed:
                raise ConfigError(f"{name}={value!r} contradicts family {self.family!r}, which "
                                  f"has {name}={fixed!r}", where=f"model.{name}",
                                  fix=f"leave model.{name} unset (the family sets it) or choose "
                                      f"a family with {name}={value!r}")

    def _check_experts(self):
        moe = self.family in MOE_FAMILIES
        require(moe or self.num_experts == 0, "model.num_experts",
                f"family {self.family!r} is dense but num_experts={self.num_experts}",
                f"use a mixture-of-experts family ({', '.join(MOE_FAMILIES)}) or num_experts=0")
        require(moe or self.shared_expert_size == 0, "model.shared_expert_size",
                f"family {self.family!r} is dense but shared_expert_size="
                f"{self.shared_expert_size}", "use qwen2_moe or shared_expert_size=0")
        if not moe:
            return
        require(self.num_experts >= 2, "model.num_experts",
                f"family {self.family!r} needs num_experts >= 2, got {self.num_experts}",
                "set model.num_experts (e.g. 8)")
        check_range("model", "num_experts_per_tok", self.num_experts_per_tok, low=1,
                    high=self.num_experts)
        check_range("model", "moe_intermediate_size", self.moe_intermediate_size, low=0)
        check_range("model", "shared_expert_size", self.shared_expert_size, low=0)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def expert_size(self) -> int:
        """Width of one expert's MLP."""
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.resolved_head_dim) ** -0.5

    def layer_windows(self) -> list[int]:
        """Sliding-window size per layer (0 = global attention)."""
        if self.local_layers == "all":
            return [self.sliding_window] * self.num_layers
        if self.local_layers == "even":
            return [self.sliding_window if i % 2 == 0 else 0 for i in range(self.num_layers)]
        if self.local_layers == "interleaved":
            n = self.global_layer_interval
            return [self.sliding_window if (i + 1) % n else 0 for i in range(self.num_layers)]
        return [0] * self.num_layers

    def num_params(self) -> int:
        """Parameter count of the model this config builds."""
        return self._count(self.num_experts)

    def num_active_params(self) -> int:
        """Parameters one token uses: :meth:`num_params` with only the
        ``num_experts_per_tok`` chosen experts counted (equal to it for dense models)."""
        return self._count(self.num_experts_per_tok if self.is_moe else 0)

    def _count(self, experts: int) -> int:
        d, hd, f = self.hidden_size, self.resolved_head_dim, self.intermediate_size
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm == "head":
            attn += 2 * hd
        elif self.qk_norm == "full":
            attn += hd * (self.num_heads + self.num_kv_heads)
        norms = d * (4 if self.post_norms else 2)
        mlp = 3 * d * f
        if self.is_moe:
            mlp = experts * 3 * d * self.expert_size + d * self.num_experts
            if self.shared_expert_size:
                mlp += 3 * d * self.shared_expert_size + d
        layer = attn + mlp + norms
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + d
