"""Pure-functional Flax decoder models: the families in :mod:`cadenza.models.families`
(Llama, Mistral, Qwen2/3, Gemma 1/2/3, Mixtral, Qwen3-MoE, OLMoE).

- :class:`ModelConfig`: shapes and family switches.
- :class:`Transformer`: the Flax module; ``apply`` returns (logits, hidden, cache).
- :func:`init_params`: plain nested-dict params, sharded on a mesh if given.
- :class:`KVCache`: the preallocated decode cache.
- :func:`save_model` / :func:`load_model`: cadenza model directories.
- :func:`load_hf` / :func:`import_hf` / :func:`save_hf` / :func:`check_hf`: Hugging Face
  checkpoints in and out, and a logit parity check against transformers.
- :func:`load_tokenizer` / :func:`train_tokenizer`, :class:`ChatTemplate`: text and chat.

Names are imported lazily so that reading configs does not import JAX.
"""

from cadenza.lazy_exports import lazy_getattr

_EXPORTS = {
    "KVCache": "cadenza.models.cache",
    "ModelConfig": "cadenza.models.config",
    "RopeScalingConfig": "cadenza.models.config",
    "Transformer": "cadenza.models.transformer",
    "init_params": "cadenza.models.params",
    "abstract_params": "cadenza.models.params",
    "save_model": "cadenza.models.checkpoint",
    "load_hf": "cadenza.models.hf_import",
    "import_hf": "cadenza.models.hf_import",
    "save_hf": "cadenza.models.hf_export",
    "check_hf": "cadenza.models.hf_check",
    "load_model": "cadenza.models.checkpoint",
    "logical_param_specs": "cadenza.models.params",
    "param_shardings": "cadenza.models.params",
    "stack_layers": "cadenza.models.params",
    "decode_layout": "cadenza.models.params",
    "unstack_layers": "cadenza.models.params",
    "Tokenizer": "cadenza.models.tokenizer",
    "load_tokenizer": "cadenza.models.tokenizer",
    "train_tokenizer": "cadenza.models.tokenizer",
    "ChatTemplate": "cadenza.models.chat_template",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
