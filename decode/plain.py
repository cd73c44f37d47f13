"""Plain autoregressive decoding (methods ``greedy`` and ``sample``), with proxy-tuning partners.

1. **Prefill**: the right-padded prompts go through each forward in one call
   that writes their keys/values into a fresh cache (after the forward's
   prefix slots); ``cache.with_lengths`` then hides the padding, and the first
   token is drawn from the logits at each row's last prompt position (the
   model computes logits only there).
2. **Step**: each row's last token (the "pending" token, not yet cached) is
   fed at position ``lengths[b]``; only unfinished rows advance their caches.
   A finished row keeps computing (static shapes) but its outputs are masked.

Proxy-tuning / EFT (:class:`ProxyTuning`): the base, expert and anti-expert
forwards decode in lockstep, each with its own params and cache; the
next-token logits are ``base + alpha * (expert - anti)``, then the usual
processing. (EFT's ``log p_base + beta (log p_ft - log p_pre)``, renormalised,
is the same distribution with ``alpha = beta``: per-row log-normalisers are
constants that cancel in the softmax.) ``alpha`` is a traced value.
"""

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from cadenza.decode import sampling
from cadenza.decode.config import SamplingSpec
from cadenza.decode.method import Batch, Emitted, MethodBase, not_finite
from cadenza.errors import CadenzaError


@dataclasses.dataclass(frozen=True)
class ProxyTuning:
    """Partners for proxy-tuning / EFT: ``logits = base + alpha * (expert - anti)``.

    ``expert`` is the small tuned model, ``anti`` the small untuned one (a
    Transformer or any forward); both must share the base model's vocabulary.
    """

    expert: Any
    expert_params: Any
    anti: Any
    anti_params: Any


@flax.struct.dataclass
class PlainState:
    """out: the emitted tokens; caches: one KVCache per forward (lengths = cached
    tokens; the last emitted token is pending, not yet cached); seen: bool [B, V]
    prompt + generated tokens (repetition penalty) or None; keys: per-row PRNG
    keys [B] (sampling, or per-row settings) or None; rows: per-row sampler settings
    (:class:`~cadenza.decode.sampling.RowSampling`, from ``Batch.rows``) or None."""

    out: Emitted
    caches: tuple
    seen: jax.Array | None
    keys: jax.Array | None
    rows: Any = None


def first_logits(forward, params, batch: Batch):
    """Prefill ``batch`` through ``forward``: returns ``(logits float32 [B, V] at each row's
    last prompt token, hidden [B, D] there, cache with the prompt cached)``."""
    b = batch.tokens.shape[0]
    cache = forward.init_cache(params, b, batch.max_len)
    start = cache.lengths
    logits, hidden, cache = forward(params, batch.tokens, cache=cache,
                                    logits_at=(batch.lengths - 1)[:, None])
    last = jnp.take_along_axis(hidden, (batch.lengths - 1)[:, None, None], axis=1)[:, 0]
    return logits[:, 0], last, cache.with_lengths(start + batch.lengths)


def seen_mask(batch: Batch, vocab: int):
    """bool [B, V]: the tokens of each row's prompt."""
    b, t = batch.tokens.shape
    valid = jnp.arange(t)[None, :] < batch.lengths[:, None]
    return jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], batch.tokens].max(valid)


def mark_seen(seen, tokens, count, active):
    """``seen`` [B, V] with ``tokens[:, :count]`` (int32 [B, K]) of running rows added."""
    if seen is None:
        return None
    k = tokens.shape[1]
    hot = jax.nn.one_hot(tokens, seen.shape[-1], dtype=bool) & (
        jnp.arange(k)[None, :] < count[:, None])[..., None]
    return seen | (jnp.any(hot, axis=1) & active[:, None])


@dataclasses.dataclass(frozen=True)
class Plain(MethodBase):
    """Greedy or sampled decoding, one token per step; ``forwards``: the base forward, then
    the proxy expert and anti-expert if any. Params: ``(tuple of params per forward, alpha)``."""

    forwards: tuple
    spec: SamplingSpec
    name: str = "greedy"

    @property
    def forward(self):
        return self.forwards[0]

    def model_configs(self):
        return [f.config for f in self.forwards]

    def check(self) -> None:
        """Raise before compiling when the partners' vocabularies or ``top_k`` do not fit."""
        vocabs = [c.vocab_size for c in self.model_configs()]
        if len(set(vocabs)) > 1:
            raise CadenzaError(
                f"proxy-tuning models disagree on the vocabulary: base {vocabs[0]}, expert "
                f"{vocabs[1]}, anti-expert {vocabs[2]}", where="generate(proxy=...)",
                fix="use an expert and anti-expert that share the base model's tokenizer")
        check_top_k(self.spec, vocabs[0])

    @staticmethod
    def _combine(logits, alpha):
        if len(logits) == 1:
            return logits[0]
        base, expert, anti = logits
        return base + alpha * (expert - anti)

    def _emit(self, state: PlainState, logits) -> PlainState:
        out = state.out
        logp = sampling.log_probs(logits, self.spec, state.seen, state.rows)
        tok, lp = sampling.select(logp, self.spec, state.keys, out.step, state.rows)
        one = jnp.ones_like(out.num_generated)
        return state.replace(out=out.append(tok[:, None], lp[:, None], one, not_finite(logits)),
                             seen=mark_seen(state.seen, tok[:, None], one, ~out.done))

    def prefill(self, params, batch: Batch) -> PlainState:
        """Prompts -> state with the first token chosen."""
        all_params, alpha = params
        caches, logits = [], []
        for f, p in zip(self.forwards, all_params):
            lg, _, cache = first_logits(f, p, batch)
            caches.append(cache)
            logits.append(lg)
        vocab = logits[0].shape[-1]
        state = PlainState(
            out=Emitted.create(batch), caches=tuple(caches),
            seen=seen_mask(batch, vocab) if self.spec.uses_history else None,
            keys=sampling.row_keys(batch.seeds) if self.spec.method == "sample"
            or batch.rows is not None else None, rows=batch.rows)
        return self._emit(state, self._combine(logits, alpha))

    def step(self, params, state: PlainState) -> PlainState:
        """Feed each row's pending token, choose the next one."""
        all_params, alpha = params
        pending = state.out.last[:, None]
        keep = (~state.out.done).astype(jnp.int32)
        caches, logits = [], []
        for f, p, c in zip(self.forwards, all_params, state.caches):
            lg, _, cache = f(p, pending, cache=c)
            caches.append(cache.advance(keep))
            logits.append(lg[:, 0])
        return self._emit(state.replace(caches=tuple(caches)), self._combine(logits, alpha))


def check_top_k(spec: SamplingSpec, vocab: int) -> None:
    """Raise unless ``spec.top_k`` fits the vocabulary."""
    if spec.top_k > vocab:
        raise CadenzaError(f"top_k={spec.top_k} exceeds the vocabulary size {vocab}",
                           where="decode.sampling.top_k", fix=f"use top_k <= {vocab} (0 = off)")
