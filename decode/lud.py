"""Lexical Unit Decoding (LUD): parallel decoding of confident spans.

Each step feeds, per row, ``[pending real tokens (1..m+1, padded to m+1), m placeholders]``
(W = 2m + 1 slots) on top of the KV cache, which holds every committed real token:

- The last pending token gives t_0 = argmax (always kept: plain greedy decoding).
- Placeholder j (1..m) gives t_j = argmax with confidence c_j = its top probability.
  t_1..t_J are accepted for the largest J with every c_j >= beta, and, with
  ``cut_repeats``, no t_j equal to t_{j-1}.
- The pending tokens are committed (``lengths += pending count``); [t_0..t_J] become the
  next step's pending tokens. Placeholder and padding K/V are written past the new
  lengths, so they are dropped for free and never seen again.

Slot layout and mask (bool [B, W, W]): pending slot i (0..m) has position L + i and sees
valid pending slots i' <= i (slots >= the pending count are padding, seen by no one);
placeholder slot m + j has position L + p - 1 + j (p = pending count; the position the
token it predicts would be fed at, as in training) and sees the valid pending slots and
placeholders j' <= j. Real tokens never see placeholders, so t_0 is exactly the greedy
token: beta > 1 or m = 0 gives greedy decoding.

[choices] Only greedy t_0 (no sampling); EOS ends a row at the first EOS among the
accepted tokens; accepted tokens past ``max_new_tokens`` are cut; accepted placeholder
tokens are not verified (lossy, as in the paper); an optional lossless mode
(verifying placeholder tokens) is not built. Prompts are right-padded and prefilled
at once; all but each prompt's last token are committed, the last one is the first pending token.
"""

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from cadenza.decode.method import Batch, Emitted, MethodBase, not_finite


@flax.struct.dataclass
class LudState:
    """out: the emitted tokens (``out.step`` counts the prefill and steps); cache: only
    committed real tokens below ``lengths``; pending int32 [B, m + 1] the uncommitted
    real tokens (``count`` [B] of them); steps int32 [B] model calls per running row."""

    out: Emitted
    cache: Any
    pending: jax.Array
    count: jax.Array
    steps: jax.Array


def _step_mask(p: jax.Array, m: int) -> jax.Array:
    """bool [B, W, W] visibility among the W = 2m + 1 new slots (pending count ``p`` [B])."""
    w = 2 * m + 1
    idx = jnp.arange(w)
    is_ph = idx > m
    valid_real = (idx[None, :] < p[:, None]) & ~is_ph[None, :]              # [B, W] keys
    causal = idx[:, None] >= idx[None, :]
    ph_pair = is_ph[:, None] & is_ph[None, :] & causal                       # [W, W]
    real_q = ~is_ph[:, None] & causal                                        # [W, W]
    see_real = (real_q | is_ph[:, None])[None] & valid_real[:, None, :]
    return see_real | ph_pair[None]


def accepted_count(cand: jax.Array, conf: jax.Array, beta, cut_repeats: bool) -> jax.Array:
    """How many of ``cand`` [B, m + 1] = [t_0, t_1..t_m] a step keeps: int32 [B] = 1 + J.

    J is the largest j with every c_1..c_j >= beta (``conf`` [B, m]) and, with
    ``cut_repeats``, no t_i (i <= j) equal to t_{i-1}.
    """
    ok = conf >= beta
    if cut_repeats:
        ok = ok & (cand[:, 1:] != cand[:, :-1])
    return 1 + jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)


@dataclasses.dataclass(frozen=True)
class Lud(MethodBase):
    """LUD as a method: ``forward``, ``lookahead`` m, ``cut_repeats``, ``placeholder_id``,
    ``pad_id``. Params: ``(model params, beta)`` (beta traced: sweeping it does not
    recompile). ``extras["steps"]``: model calls per row after the prefill; the
    result's ``stats["tokens_per_step"]`` is the speed-up statistic (1.0 = greedy).
    Log-probs: t_0's under the model, a placeholder token's its confidence's log."""

    forward: Any
    lookahead: int
    cut_repeats: bool
    placeholder_id: int
    pad_id: int = 0
    name: str = "lud"

    @property
    def slots(self) -> int:
        return 2 * self.lookahead + 1

    def model_configs(self):
        return [self.forward.config]

    def prefill(self, params, batch: Batch) -> LudState:
        """Cache every prompt token but the last, which becomes the first pending token."""
        mparams, _ = params
        b, m = batch.tokens.shape[0], self.lookahead
        cache = self.forward.init_cache(mparams, b, batch.max_len)
        start = cache.lengths
        _, _, cache = self.forward(mparams, batch.tokens, cache=cache,
                                   logits_at=jnp.zeros((b, 1), jnp.int32))
        cache = cache.with_lengths(start + batch.lengths - 1)
        last = jnp.take_along_axis(batch.tokens, (batch.lengths - 1)[:, None], axis=1)[:, 0]
        out = Emitted.create(batch, extra=m + 1)
        return LudState(out=out.replace(step=out.step + 1), cache=cache,
                        pending=jnp.full((b, m + 1), self.pad_id, jnp.int32).at[:, 0].set(last),
                        count=jnp.ones((b,), jnp.int32), steps=jnp.zeros((b,), jnp.int32))

    def step(self, params, s: LudState) -> LudState:
        """Feed the pending tokens and m placeholders; keep t_0 and the confident t_j."""
        mparams, beta = params
        m = self.lookahead
        b = s.pending.shape[0]
        slot = jnp.arange(m + 1)
        p = s.count
        tokens = jnp.concatenate([s.pending, jnp.full((b, m), self.placeholder_id, jnp.int32)],
                                 axis=1)
        lengths = s.cache.lengths[:, None]
        positions = jnp.concatenate(
            [lengths + slot[None], lengths + p[:, None] - 1 + jnp.arange(1, m + 1)[None]], axis=1)
        read = jnp.concatenate([(p - 1)[:, None], m + 1 + jnp.arange(m)[None].repeat(b, 0)], 1)
        logits, _, new_cache = self.forward(mparams, tokens, positions=positions,
                                            attention_mask=_step_mask(p, m), cache=s.cache,
                                            logits_at=read)
        logp = jax.nn.log_softmax(logits, axis=-1)                              # [B, m+1, V]
        cand = jnp.argmax(logits, axis=-1).astype(jnp.int32)                    # [B, m+1]
        lp = jnp.max(logp, axis=-1)
        count = accepted_count(cand, jnp.exp(lp[:, 1:]), beta, self.cut_repeats)
        active = ~s.out.done
        keep = active[:, None]
        new_cache = new_cache.with_lengths(s.cache.lengths + jnp.where(active, p, 0))
        return LudState(out=s.out.append(cand, lp, count, not_finite(logits)), cache=new_cache,
                        pending=jnp.where(keep, cand, s.pending), count=jnp.where(active, count, p),
                        steps=s.steps + active)

    def extras(self, state: LudState) -> dict:
        return {"steps": state.steps}

    def host_stats(self, params, harvest, decoded: int) -> dict:
        """``tokens_per_step``: generated tokens per model call over all rows."""
        steps = max(int(harvest.extras["steps"].sum()), 1)
        return {"tokens_per_step": float(harvest.num_generated.sum()) / steps}


def lud_method(forward, params, lud) -> Lud:
    """The :class:`Lud` method for ``forward`` and ``lud`` (a LudConfig; None = defaults);
    raises before compiling on an invalid placeholder id."""
    from cadenza.decode.lud_config import LudConfig

    lud = lud or LudConfig()
    return Lud(forward=forward, lookahead=lud.lookahead, cut_repeats=lud.cut_repeats,
               placeholder_id=lud.placeholder_for(forward.config))
