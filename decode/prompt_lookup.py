"""Prompt lookup decoding: drafts copied from the row's own context (no draft model).

Each round, the last ``k`` tokens of the row (prompt + output + pending
token), for ``k = max_ngram .. min_ngram``, are searched for earlier in the
same row; at the earliest match of the longest ``k`` that matches, the
``gamma`` tokens that followed it are the draft (fewer if the context ends
first; none without a match: the round then verifies the pending token alone, a plain
step, and otherwise only as far as the longest draft). On device this is a sliding
window match mask ``[B, S]``, an argmax and a gather.

The draft is a point mass (``q`` is None), so exact sampling accepts d_i with
probability p_i(d_i), else samples p_i with d_i removed. A drafter of the
speculative round (:mod:`cadenza.decode.speculative`); its ``observe``
appends what the round emitted to the context.
"""

import dataclasses

import jax
import jax.numpy as jnp

from cadenza.decode.speculative import Proposal, chain


@dataclasses.dataclass(frozen=True)
class PromptLookup:
    """Drafter state: ``context`` int32 [B, max_len + 1], the row's tokens (prompt, emitted).

    The row's valid context is ``[0, L_b + 1)``: the cached tokens and the pending one.
    """

    gamma: int = 8
    max_ngram: int = 3
    min_ngram: int = 1
    name: str = "ngram"
    # drafts vary in length and may be empty: the round verifies only as far as the
    # longest, the pending token alone when no row matched (speculative.verify_longest)
    variable_length = True
    empty_drafts = True

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")

    @property
    def parents(self) -> tuple:
        return chain(self.gamma)

    def check(self, forward, draft_params) -> None:
        """Nothing to check: drafts come from the row itself."""

    def cost_ratio(self, params, draft_params) -> float:
        return 0.0

    def init(self, draft_params, pre):
        """The context buffer: the prompt, then the first emitted token."""
        tokens, lengths = pre.batch.tokens, pre.batch.lengths
        b, t = tokens.shape
        ctx = jnp.zeros((b, pre.batch.max_len + 1), jnp.int32).at[:, :t].set(tokens)
        return ctx.at[jnp.arange(b), lengths].set(pre.first)

    def propose(self, draft_params, ctx, context):
        """A chain copied from the earliest match of the longest matching n-gram."""
        b, size = ctx.shape
        g = self.gamma
        end = context.lengths + 1                                          # valid context length
        pos = jnp.arange(size)[None, :]
        padded = jnp.pad(ctx, ((0, 0), (0, self.max_ngram)))
        start = jnp.zeros((b,), jnp.int32)
        found = jnp.zeros((b,), bool)
        for k in range(self.max_ngram, self.min_ngram - 1, -1):
            tail = jnp.take_along_axis(ctx, jnp.clip(end[:, None] - k + jnp.arange(k), 0,
                                                     size - 1), axis=1)
            match = (pos + k < end[:, None]) & (end[:, None] >= k + 1)
            for t in range(k):
                match &= padded[:, t:t + size] == tail[:, t:t + 1]
            hit = jnp.any(match, axis=1)
            first = jnp.argmax(match, axis=1).astype(jnp.int32) + k
            start = jnp.where(~found & hit, first, start)
            found |= hit
        idx = jnp.clip(start[:, None] + jnp.arange(g)[None, :], 0, size - 1)
        drafts = jnp.take_along_axis(ctx, idx, axis=1)
        dlen = jnp.where(found, jnp.clip(end - start, 0, g), 0).astype(jnp.int32)
        valid = jnp.arange(g)[None, :] < dlen[:, None]
        return Proposal(tokens=drafts, valid=valid, q=None, parents=self.parents), ctx

    def observe(self, draft_params, ctx, obs):
        """Append the emitted tokens (d_1..d_n, y) after the old pending token."""
        write = jax.vmap(lambda row, x, at: jax.lax.dynamic_update_slice(row, x, (at,)))
        return jnp.where(obs.active[:, None], write(ctx, obs.emitted, obs.lengths + 1), ctx)
