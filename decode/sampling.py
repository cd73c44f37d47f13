"""Logit processing and token selection: pure, jittable functions over ``[B, V]`` logits.

Every decoding loop (plain, speculative, proxy-tuned) turns raw logits into
the distribution it draws from with :func:`log_probs`, then picks tokens
with :func:`select` (greedy or sampled with per-row keys). Speculative
decoding must apply the *same* :class:`SamplingSpec` to target and draft so
that the acceptance rule compares like with like.

Processing order (that of Hugging Face transformers' ``generate``):
repetition penalty, then (sampling only) temperature, top-k, top-p, min-p.
Filtered tokens get ``-inf`` logits, so they have probability exactly 0.
Ties at a top-k / top-p cut-off are all kept (top-k: as transformers does;
top-p: the nucleus is widened to every token tied with its last member).

The spec is static: a frozen dataclass read at trace time, so disabled
steps cost nothing (no sort unless top-p is on) and a change recompiles.
A :class:`RowSampling` (per-row settings as data, for the serving engine's
slots) overrides the spec's warpers: one program serves any mix of greedy and
sampled rows, at the price of a sort per step.
"""

import flax.struct
import jax
import jax.numpy as jnp

from cadenza.decode.config import SamplingSpec

__all__ = ["SamplingSpec", "RowSampling", "repetition_penalty", "top_k_filter", "top_p_filter",
           "min_p_filter", "row_warp", "log_probs", "row_keys", "sample", "select"]


def repetition_penalty(logits, seen, penalty: float):
    """CTRL-style penalty on tokens seen so far (prompt and output).

    A seen token's logit is divided by ``penalty`` if positive, multiplied
    if negative. ``seen``: bool [B, V]. Returns float32 [B, V].
    """
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def top_k_filter(logits, k: int):
    """Keep the ``k`` largest logits per row (and any tied with the k-th); -inf elsewhere."""
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits, p: float):
    """Keep the smallest set of most likely tokens whose probability sums to >= ``p``.

    A token is kept iff the probability of the tokens strictly more likely
    than it (in sorted order) is < ``p``; the most likely token is always kept.
    """
    desc = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(before < p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(desc, jnp.maximum(n_keep - 1, 0), axis=-1)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def min_p_filter(logits, min_p: float):
    """Keep tokens whose probability is >= ``min_p`` times the row's largest probability."""
    # p_i >= min_p * p_max  <=>  z_i - z_max >= log(min_p)
    z_max = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.where(logits - z_max >= jnp.log(min_p), logits, -jnp.inf)


@flax.struct.dataclass
class RowSampling:
    """Sampler settings per row, as data: ``temperature`` float32 [B] (0 = greedy: the
    argmax, no warpers), ``top_k`` int32 [B] (0 = off), ``top_p`` float32 [B] (1 = off),
    ``min_p`` float32 [B] (0 = off). Same processing order as :class:`SamplingSpec`."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array

    @classmethod
    def of(cls, temperature, top_k, top_p, min_p) -> "RowSampling":
        """From per-row sequences (or numpy arrays) of the four settings."""
        return cls(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
                   jnp.asarray(top_p, jnp.float32), jnp.asarray(min_p, jnp.float32))

    @property
    def greedy(self) -> jax.Array:
        """bool [B]: rows that take the argmax."""
        return self.temperature <= 0.0

    def repeat(self, n: int) -> "RowSampling":
        """Each row's settings repeated ``n`` times (rows of ``[B * n, V]`` logits)."""
        return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), self)


def row_warp(z, rows: RowSampling):
    """Temperature, top-k, top-p and min-p with per-row settings on float32 [B, V] logits;
    greedy rows and disabled filters leave a row unchanged. Returns float32 [B, V]."""
    greedy = rows.greedy[:, None]
    z = z / jnp.where(greedy, 1.0, rows.temperature[:, None])
    desc = jnp.sort(z, axis=-1)[..., ::-1]
    k = rows.top_k[:, None]
    kth = jnp.take_along_axis(desc, jnp.clip(k - 1, 0, z.shape[-1] - 1), axis=-1)
    z = jnp.where(greedy | (k == 0) | (z >= kth), z, -jnp.inf)
    p = rows.top_p[:, None]
    z = jnp.where(greedy | (p >= 1.0), z, top_p_filter(z, p))
    m = rows.min_p[:, None]
    return jnp.where(greedy | (m <= 0.0), z, min_p_filter(z, jnp.maximum(m, 1e-30)))


def log_probs(logits, spec: SamplingSpec, seen=None, rows: RowSampling | None = None):
    """The final log-probabilities a token is drawn from.

    Args:
      logits: float [B, V] raw model logits (or a combination, e.g. proxy-tuning).
      spec: the static :class:`SamplingSpec`.
      seen: bool [B, V] tokens so far; required iff ``spec.uses_history``.
      rows: per-row settings replacing the spec's method and warpers (the repetition
        penalty stays the spec's), or None.

    Returns:
      float32 [B, V] normalised log-probabilities, ``-inf`` on filtered tokens.
    """
    z = logits.astype(jnp.float32)
    if spec.uses_history:
        if seen is None:
            raise ValueError("repetition_penalty needs the seen-token mask")
        z = repetition_penalty(z, seen, spec.repetition_penalty)
    if rows is not None:
        z = row_warp(z, rows)
    elif spec.method == "sample":
        if spec.temperature != 1.0:
            z = z / spec.temperature
        if spec.top_k:
            z = top_k_filter(z, spec.top_k)
        if spec.top_p < 1.0:
            z = top_p_filter(z, spec.top_p)
        if spec.min_p > 0.0:
            z = min_p_filter(z, spec.min_p)
    return jax.nn.log_softmax(z, axis=-1)


def row_keys(seeds):
    """Per-row PRNG keys [B] from int32 seeds [B]: a row's draws depend only on its seed."""
    return jax.vmap(jax.random.key)(seeds)


def sample(logp, keys, step):
    """Draw one token per row from ``logp`` [B, V] with key ``fold_in(keys[b], step)``.

    ``step`` is the index of the token being drawn (int or int32 scalar), so
    a row's draws are reproducible whatever else is in the batch.
    Returns int32 [B].
    """
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    return jax.vmap(jax.random.categorical)(step_keys, logp).astype(jnp.int32)


def select(logp, spec: SamplingSpec, keys=None, step=0, rows: RowSampling | None = None):
    """Pick the next token per row: argmax for greedy, else :func:`sample`; with ``rows``
    (needs ``keys``), per row as ``rows.greedy`` says.

    Returns ``(tokens int32 [B], their log-probabilities float32 [B])``.
    """
    if rows is not None:
        tokens = jnp.where(rows.greedy, jnp.argmax(logp, axis=-1).astype(jnp.int32),
                           sample(logp, keys, step))
    elif spec.method == "greedy":
        tokens = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    else:
        tokens = sample(logp, keys, step)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
