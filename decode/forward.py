"""Forward-function objects: what a decoding method calls to run the model.

A method never builds a model itself; it is given a *forward* (a frozen,
hashable dataclass, part of the compiled-program key) with:

- ``config``: the :class:`~cadenza.models.ModelConfig` (vocabulary, positions, cache shapes);
- ``init_cache(params, batch, max_len) -> KVCache``: an empty cache, or one whose first
  ``cache.lengths`` slots already hold a prefix (prefix / prompt tuning);
- ``__call__(params, tokens=None, *, embeddings=None, positions=None, attention_mask=None,
  cache=None, logits_at=None) -> (logits, hidden, cache)``: the model's own contract
  (:class:`cadenza.models.Transformer`), logits only at ``logits_at`` when given;
- ``embed(params, tokens)``: raw embedding rows [B, T, D] (Superposed Decoding).

:class:`ModelForward` wraps a plain Transformer (params = its param dict);
:class:`PeftForward` wraps a :class:`cadenza.train.peft.model.PeftModel` (params =
``(trainable, frozen)``), so every adapter method decodes, prefix and prompt
tuning included. Proxy-tuning partners are further forwards.
"""

import dataclasses
from typing import Any

import flax.linen as nn

from cadenza.errors import CadenzaError
from cadenza.models.cache import KVCache
from cadenza.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class ModelForward:
    """A plain :class:`~cadenza.models.Transformer`; ``rules``: logical-axis rules or None;
    ``kv_cache``: ``auto`` (the compute dtype) or ``int8`` (:mod:`cadenza.models.cache`)."""

    config: Any
    rules: tuple | None = None
    kv_cache: str = "auto"

    def init_cache(self, params, batch: int, max_len: int) -> KVCache:
        """An empty KVCache of ``max_len`` slots per row (lengths 0)."""
        return KVCache.create(self.config, batch, max_len, cache_dtype(self.kv_cache))

    def __call__(self, params, tokens=None, *, embeddings=None, positions=None,
                 attention_mask=None, cache=None, logits_at=None):
        """``Transformer.apply``: returns ``(logits float32, hidden, cache)`` (see the model)."""
        with nn.logical_axis_rules(self.rules or ()):
            return Transformer(self.config).apply(
                {"params": params}, tokens, embeddings=embeddings, positions=positions,
                attention_mask=attention_mask, cache=cache, logits_at=logits_at)

    def embed(self, params, tokens):
        """Raw embedding rows [B, T, D] of ``tokens`` int32 [B, T]."""
        with nn.logical_axis_rules(self.rules or ()):
            return Transformer(self.config).apply({"params": params}, tokens,
                                                  method=Transformer.embed_tokens)


@dataclasses.dataclass(frozen=True, eq=False)
class PeftForward:
    """An adapted model: ``peft`` a PeftModel; params are ``(trainable, frozen)``.

    The cache starts with the adapter's virtual tokens (prefix K/V, or the
    prefilled soft prompt) so that decoding equals the cache-free forward.
    Equality and hashing go by the PeftModel's description (its config holds lists).
    """

    peft: Any
    rules: tuple | None = None
    kv_cache: str = "auto"

    def _key(self):
        return (repr(self.peft), self.rules, self.kv_cache)

    def __eq__(self, other):
        return isinstance(other, PeftForward) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    @property
    def config(self):
        return self.peft.model_config

    @property
    def prefix_slots(self) -> int:
        """Cache slots the adapter occupies before the prompt (0 unless prefix/prompt)."""
        if self.peft.method in ("prefix", "prompt"):
            return self.peft.peft_config.num_virtual_tokens
        return 0

    def init_cache(self, params, batch: int, max_len: int) -> KVCache:
        """A cache with the adapter's virtual tokens in its first slots (``max_len`` in all)."""
        with nn.logical_axis_rules(self.rules or ()):
            return self.peft.init_cache(params[0], params[1], batch, max_len,
                                        cache_dtype(self.kv_cache))

    def __call__(self, params, tokens=None, *, embeddings=None, positions=None,
                 attention_mask=None, cache=None, logits_at=None):
        """``PeftModel.apply`` with the same contract as :meth:`ModelForward.__call__`."""
        with nn.logical_axis_rules(self.rules or ()):
            return self.peft.apply(params[0], params[1], tokens, embeddings=embeddings,
                                   positions=positions, attention_mask=attention_mask,
                                   cache=cache, logits_at=logits_at)

    def embed(self, params, tokens):
        """Raw embedding rows [B, T, D] (the frozen base's embedding)."""
        base = params[0]["params"] if "params" in params[0] else params[1]["params"]
        return ModelForward(self.config, self.rules).embed(base, tokens)


def cache_dtype(kv_cache: str):
    """The KVCache dtype for a ``decode.kv_cache`` choice: None (compute dtype) or int8."""
    return None if kv_cache == "auto" else kv_cache


def with_kv_cache(forward, kv_cache: str):
    """``forward`` storing its KV cache as ``kv_cache`` (``auto`` or ``int8``).

    CadenzaError for a forward without a ``kv_cache`` setting (a custom forward)."""
    if kv_cache == getattr(forward, "kv_cache", "auto"):
        return forward
    if not hasattr(forward, "kv_cache"):
        raise CadenzaError(f"{type(forward).__name__} has no kv_cache setting",
                           where="decode.kv_cache", fix="use decode.kv_cache=auto")
    return dataclasses.replace(forward, kv_cache=kv_cache)


def prefix_slots(forward) -> int:
    """Cache slots a forward's ``init_cache`` fills before the prompt."""
    return getattr(forward, "prefix_slots", 0)


def as_forward(model, rules=None):
    """A forward for ``model``: a Transformer, a ModelConfig, a PeftModel or a forward."""
    if hasattr(model, "init_cache") and hasattr(model, "embed"):
        return model
    if isinstance(model, Transformer):
        return ModelForward(model.config, None if rules is None else tuple(rules))
    if hasattr(model, "peft_config"):
        return PeftForward(model, None if rules is None else tuple(rules))
    return ModelForward(model, None if rules is None else tuple(rules))
