"""Plain-XLA attention over an optional KV-cache prefix plus a block of new tokens.

This is the reference every attention kernel in ``pallas_kernels`` is
tested against, and the implementation used where no kernel applies.

Visibility rule (one rule for training, prefill, decode and tree/LUD
verification): query ``i`` of row ``b`` sees

- cached slot ``j`` iff ``j < cache_lengths[b]``, and
- new token ``k`` iff ``tail_mask[b, i, k]`` (default: causal ``k <= i``)
  and, when ``segment_ids`` are given, both tokens are in the same segment;

and in both cases, when the layer's ``window > 0``, only keys whose position
is within ``window`` of the query position (``q_pos - k_pos < window``).
A query that sees nothing gets zeros, never NaN.

An int8 cache arrives as int8 codes plus float32 scales per slot and kv head
(``k_scale``/``v_scale`` [B, S, Hkv]); its values are ``codes * scale``
(:func:`dequantize`).
"""

import jax
import jax.numpy as jnp

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def dequantize(codes, scale, dtype):
    """int8 cache codes [..., D] and float32 scales [...] -> ``codes * scale`` in ``dtype``
    (the product computed in float32)."""
    return (codes.astype(jnp.float32) * scale[..., None]).astype(dtype)


def attention_mask(*, q_positions, tail_mask=None, segment_ids=None, window=0,
                   cache_lengths=None, cache_positions=None):
    """Boolean visibility ``[B, T, S + T]``: the cache slots first, then the new tokens.

    Args:
      q_positions: int32 [B, T] positions of the new tokens.
      tail_mask: bool [B, T, T] or [T, T] among the new tokens; None = causal.
      segment_ids: int32 [B, T] or None; new tokens only see their own segment.
      window: int (or int32 scalar, e.g. per scanned layer); 0 = unlimited.
      cache_lengths: int32 [B] valid prefix per row, or None (no cache).
      cache_positions: int32 [B, S] positions of the cache slots (with a cache).
    """
    b, t = q_positions.shape
    if tail_mask is None:
        tail_mask = jnp.tril(jnp.ones((t, t), dtype=bool))
    tail = jnp.broadcast_to(tail_mask, (b, t, t))
    if segment_ids is not None:
        tail = tail & (segment_ids[:, :, None] == segment_ids[:, None, :])
    k_positions = q_positions
    if cache_lengths is not None:
        s = cache_positions.shape[1]
        prefix = jnp.arange(s)[None, None, :] < cache_lengths[:, None, None]
        tail = jnp.concatenate([jnp.broadcast_to(prefix, (b, t, s)), tail], axis=-1)
        k_positions = jnp.concatenate([cache_positions, q_positions], axis=1)
    in_window = (q_positions[:, :, None] - k_positions[:, None, :]) < window
    return tail & ((window <= 0) | in_window)


def masked_scores(q, k, mask, *, scale, logit_soft_cap=0.0):
    """Grouped-query scores ``[B, Hkv, G, T, S]`` in float32: ``q.k * scale``, soft-capped
    if ``logit_soft_cap > 0``, and a large negative number where ``mask`` [B, T, S] is False.

    q: [B, T, Hq, D]; k: [B, S, Hkv, D] with Hq = G * Hkv.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if logit_soft_cap:
        scores = logit_soft_cap * jnp.tanh(scores / logit_soft_cap)
    return jnp.where(mask[:, None, None], scores, _NEG)


def reference_attention(q, k, v, *, scale, q_positions, k_cache=None, v_cache=None,
                        cache_lengths=None, cache_positions=None, tail_mask=None,
                        segment_ids=None, window=0, logit_soft_cap=0.0, k_scale=None,
                        v_scale=None):
    """Softmax attention of new tokens over (cache prefix + new tokens).

    Args:
      q: [B, T, Hq, D] queries of the new tokens.
      k, v: [B, T, Hkv, D] keys/values of the new tokens (Hq % Hkv == 0: GQA).
      scale: multiplier on q.k scores.
      k_cache, v_cache: [B, S, Hkv, D] or None; int8 codes when ``k_scale``/``v_scale``
        (float32 [B, S, Hkv]) are given.
      logit_soft_cap: if > 0, scores become ``cap * tanh(scores / cap)``.
      Other arguments: see :func:`attention_mask`.

    Returns:
      [B, T, Hq, D] in q's dtype. Scores and softmax are computed in float32.
    """
    b, t, hq, d = q.shape
    if k_scale is not None:
        k_cache, v_cache = dequantize(k_cache, k_scale, k.dtype), dequantize(v_cache, v_scale,
                                                                             v.dtype)
    if k_cache is not None:
        k = jnp.concatenate([k_cache.astype(k.dtype), k], axis=1)
        v = jnp.concatenate([v_cache.astype(v.dtype), v], axis=1)
    mask = attention_mask(q_positions=q_positions, tail_mask=tail_mask, segment_ids=segment_ids,
                          window=window, cache_lengths=cache_lengths,
                          cache_positions=cache_positions)
    scores = masked_scores(q, k, mask, scale=scale, logit_soft_cap=logit_soft_cap)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask[:, None, None], probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(b, t, hq, d)
