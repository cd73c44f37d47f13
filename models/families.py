"""The model families cadenza builds, one table entry each.

A family is a bundle of :class:`~cadenza.models.config.ModelConfig` switches
plus what it takes to convert it from and to Hugging Face: the transformers
``model_type`` and architecture class, the optional ``config.json`` keys that
class actually reads (a key the class ignores must be ignored on import too,
e.g. Llama ignores ``attn_logit_softcapping``), how it decides which layers use
a sliding window, and the HF names of its norms and MoE weights.

hf_config, hf_weights, hf_export, the presets' checks and the tests'
per-family parametrisation all read :data:`FAMILIES`. Adding a family means
adding one entry here (plus whatever new switch its architecture needs in
the model code).
"""

import dataclasses

# How a family's transformers class decides which layers are local (sliding window):
#   none:        never (the window key is not read)
#   all:         every layer when sliding_window is set (Mistral, Mixtral)
#   layer_types: from layer_types, else the family default below
WINDOW_RULES = ("none", "all", "layer_types")


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
      name: the HF ``model_type`` (also cadenza's ``model.family``).
      architecture: the transformers ``*ForCausalLM`` class name.
      switches: ModelConfig fields the family fixes (the HF config cannot change them).
      reads: optional config.json keys the HF class reads beyond the common shape keys.
      defaults: the HF class's defaults of read keys whose absence matters
        (``rope_theta`` and ``local_rope_theta`` included).
      window_rule: one of :data:`WINDOW_RULES`.
      default_layer_types: when ``window_rule`` is ``layer_types`` and config.json has
        none: ``qwen`` (sliding from ``max_window_layers`` on, if ``use_sliding_window``),
        ``even`` (Gemma-2: even layers), ``every_6th_global`` (Gemma 3, from
        ``sliding_window_pattern``, default 6) or ``odd_below_max`` (Qwen2-MoE: layers
        1, 3, 5, ... counted from 1 below ``max_window_layers``, if ``use_sliding_window``).
      norms: cadenza block norm name -> HF norm module name (per layer).
      moe_block: HF module name of the MoE MLP (``block_sparse_moe`` for Mixtral),
        empty for dense families.
      expert_names: HF names of the gate, up and down projections of one expert.
      test_overrides: extra overrides of the tests' tiny variant of this family
        (on top of ``switches``), switching on the family's special features.
    """

    name: str
    architecture: str
    switches: dict
    reads: frozenset = frozenset()
    defaults: dict = dataclasses.field(default_factory=dict)
    window_rule: str = "none"
    default_layer_types: str = ""
    norms: dict = dataclasses.field(default_factory=lambda: dict(_PRE_NORMS))
    moe_block: str = ""
    expert_names: tuple = ("gate_proj", "up_proj", "down_proj")
    test_overrides: tuple = ()

    @property
    def moe(self) -> bool:
        return bool(self.moe_block)


_PRE_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_FOUR_NORMS = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
               "mlp_norm": "pre_feedforward_layernorm",
               "mlp_post_norm": "post_feedforward_layernorm"}
_PLAIN = {"norm_plus_one": False, "post_norms": False, "scale_embeddings": False,
          "qk_norm": "none"}
_GEMMA = {"norm_plus_one": True, "scale_embeddings": True, "qkv_bias": False}
_TINY_MOE = ("model.num_experts=4", "model.num_experts_per_tok=2",
             "model.moe_intermediate_size=48")

_TABLE = [
    Family("llama", "LlamaForCausalLM", {**_PLAIN, "qkv_bias": False}),
    Family("mistral", "MistralForCausalLM", {**_PLAIN, "qkv_bias": False},
           reads=frozenset({"sliding_window"}), window_rule="all",
           test_overrides=("model.sliding_window=4", "model.local_layers=all")),
    Family("qwen2", "Qwen2ForCausalLM", {**_PLAIN, "qkv_bias": True},
           reads=frozenset({"sliding_window", "use_sliding_window", "max_window_layers",
                            "layer_types"}),
           window_rule="layer_types", default_layer_types="qwen",
           test_overrides=("model.tie_embeddings=true",)),
    Family("qwen3", "Qwen3ForCausalLM", {**_PLAIN, "qkv_bias": False, "qk_norm": "head"},
           reads=frozenset({"sliding_window", "use_sliding_window", "max_window_layers",
                            "layer_types"}),
           window_rule="layer_types", default_layer_types="qwen",
           test_overrides=("model.head_dim=32",)),
    Family("gemma", "GemmaForCausalLM", {**_GEMMA, "post_norms": False, "qk_norm": "none"},
           test_overrides=("model.activation=gelu_tanh", "model.tie_embeddings=true",
                           "model.head_dim=32", "model.num_kv_heads=1")),
    Family("gemma2", "Gemma2ForCausalLM", {**_GEMMA, "post_norms": True, "qk_norm": "none"},
           reads=frozenset({"sliding_window", "layer_types", "attn_logit_softcapping",
                            "final_logit_softcapping", "query_pre_attn_scalar"}),
           defaults={"query_pre_attn_scalar": 256, "sliding_window": 4096},
           window_rule="layer_types", default_layer_types="even", norms=_FOUR_NORMS,
           test_overrides=("model.activation=gelu_tanh", "model.tie_embeddings=true",
                           "model.head_dim=32", "model.sliding_window=4",
                           "model.local_layers=even", "model.attn_logit_softcap=5.0",
                           "model.final_logit_softcap=3.0", "model.query_pre_attn_scalar=24",
                           "model.num_layers=3")),
    Family("gemma3_text", "Gemma3ForCausalLM",
           {**_GEMMA, "post_norms": True, "qk_norm": "head"},
           reads=frozenset({"sliding_window", "layer_types", "sliding_window_pattern",
                            "attn_logit_softcapping", "final_logit_softcapping",
                            "query_pre_attn_scalar"}),
           defaults={"query_pre_attn_scalar": 256, "sliding_window": 4096,
                     "sliding_window_pattern": 6, "rope_theta": 1_000_000.0,
                     "local_rope_theta": 10_000.0},
           window_rule="layer_types", default_layer_types="every_6th_global", norms=_FOUR_NORMS,
           test_overrides=("model.activation=gelu_tanh", "model.tie_embeddings=true",
                           "model.head_dim=32", "model.sliding_window=4",
                           "model.local_layers=interleaved", "model.global_layer_interval=2",
                           "model.local_rope_theta=100.0", "model.query_pre_attn_scalar=24",
                           "model.num_layers=3")),
    Family("mixtral", "MixtralForCausalLM", {**_PLAIN, "qkv_bias": False, "norm_topk_prob": True},
           reads=frozenset({"sliding_window", "num_local_experts", "num_experts_per_tok",
                            "router_aux_loss_coef"}),
           defaults={"rope_theta": 1_000_000.0, "router_aux_loss_coef": 0.001},
           window_rule="all", moe_block="block_sparse_moe", expert_names=("w1", "w3", "w2"),
           test_overrides=_TINY_MOE),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", dict(_PLAIN),
           reads=frozenset({"qkv_bias", "sliding_window", "use_sliding_window",
                            "max_window_layers", "layer_types", "num_experts",
                            "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                            "shared_expert_intermediate_size", "norm_topk_prob",
                            "router_aux_loss_coef", "decoder_sparse_step", "mlp_only_layers"}),
           defaults={"qkv_bias": True, "router_aux_loss_coef": 0.001,
                     "shared_expert_intermediate_size": 5632},
           window_rule="layer_types", default_layer_types="odd_below_max", moe_block="mlp",
           test_overrides=_TINY_MOE + ("model.shared_expert_size=40", "model.qkv_bias=true")),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", {**_PLAIN, "qkv_bias": False, "qk_norm": "head"},
           reads=frozenset({"sliding_window", "use_sliding_window", "max_window_layers",
                            "layer_types", "num_experts", "num_local_experts",
                            "num_experts_per_tok",
                            "moe_intermediate_size", "norm_topk_prob", "router_aux_loss_coef",
                            "decoder_sparse_step", "mlp_only_layers"}),
           defaults={"router_aux_loss_coef": 0.001},
           window_rule="layer_types", default_layer_types="qwen", moe_block="mlp",
           test_overrides=_TINY_MOE + ("model.norm_topk_prob=true",)),
    Family("olmoe", "OlmoeForCausalLM",
           {**_PLAIN, "qkv_bias": False, "qk_norm": "full"},
           reads=frozenset({"num_experts", "num_experts_per_tok", "norm_topk_prob",
                            "router_aux_loss_coef", "clip_qkv"}),
           defaults={"router_aux_loss_coef": 0.01},
           moe_block="mlp", test_overrides=_TINY_MOE),
]

FAMILIES: dict[str, Family] = {f.name: f for f in _TABLE}
NAMES = tuple(FAMILIES)
MOE_FAMILIES = tuple(f.name for f in _TABLE if f.moe)


def family(name: str) -> Family:
    """The table entry of ``name`` (KeyError if cadenza does not build it)."""
    return FAMILIES[name]


def family_overrides(name: str) -> list[str]:
    """``model.field=value`` overrides switching a config to ``name`` with its features on."""
    def text(v):
        return str(v).lower() if isinstance(v, bool) else str(v)

    fam = FAMILIES[name]
    return ([f"model.family={name}"]
            + [f"model.{k}={text(v)}" for k, v in sorted(fam.switches.items())]
            + list(fam.test_overrides))
