"""The model config: one frozen dataclass covering the Llama, Mistral, Qwen2,
Gemma and Gemma-2 families.

A family is a bundle of switches (norm style, activation, biases, tying,
soft-capping, sliding windows); presets under ``configs/models/`` set them
to the published values. Fields mirror Hugging Face ``config.json`` names
where one exists, so conversion is a rename.
"""

import dataclasses
from typing import Optional

from cadenza.validation import check_choice, check_range, require

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2")
ACTIVATIONS = ("silu", "gelu_tanh")
ROPE_TYPES = ("default", "linear", "llama3")
LOCAL_LAYER_PATTERNS = ("none", "all", "even")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn_out")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "pallas", "cudnn")  # = pallas_kernels.attention.IMPLEMENTATIONS


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

    ``head_dim`` defaults to ``hidden_size // num_heads`` when left at 0.
    ``sliding_window`` applies to the layers chosen by ``local_layers``:
    ``all`` (Mistral), ``even`` (Gemma-2: layers 0, 2, 4, ... are local) or
    ``none``. ``attn_logit_softcap`` / ``final_logit_softcap`` of 0 disable
    soft-capping. ``query_pre_attn_scalar`` of 0 scales scores by
    ``head_dim ** -0.5``; otherwise by ``query_pre_attn_scalar ** -0.5``.
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
    norm_plus_one: bool = False
    post_norms: bool = False
    activation: str = "silu"
    qkv_bias: bool = False
    tie_embeddings: bool = False
    scale_embeddings: bool = False
    sliding_window: int = 0
    local_layers: str = "none"
    attn_logit_softcap: float = 0.0
    final_logit_softcap: float = 0.0
    query_pre_attn_scalar: float = 0.0
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = 0
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"

    def __post_init__(self):
        s = "model"
        check_choice(s, "family", self.family, FAMILIES)
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
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            check_range(s, name, getattr(self, name), low=0.0)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            check_range(s, name, getattr(self, name), low=0, high=self.vocab_size - 1,
                        optional=True)
        check_choice(s, "dtype", self.dtype, DTYPES)
        check_choice(s, "param_dtype", self.param_dtype, DTYPES)
        check_choice(s, "remat_policy", self.remat_policy, REMAT_POLICIES)
        check_choice(s, "attention_impl", self.attention_impl, ATTENTION_IMPLS)

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
        return [0] * self.num_layers

    def num_params(self) -> int:
        """Parameter count of the model this config builds."""
        d, hd, f = self.hidden_size, self.resolved_head_dim, self.intermediate_size
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        norms = d * (4 if self.post_norms else 2)
        layer = attn + 3 * d * f + norms
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + d
