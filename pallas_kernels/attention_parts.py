"""Attention in parts: each part returns its output and log-sum-exp, parts merge exactly.

Kernels that attend over the KV cache (split into chunks) return one
``(out, lse)`` per chunk; the new tokens' part is small and computed here in
XLA; :func:`merge_parts` combines them into the softmax over all keys.
"""

import jax.numpy as jnp

from cadenza.pallas_kernels.attention_reference import attention_mask, masked_scores


def tail_attention_with_lse(q, k, v, *, scale, q_positions, tail_mask=None, segment_ids=None,
                            window=0, logit_soft_cap=0.0):
    """Attention of the new tokens over themselves only, with its log-sum-exp.

    Args: as :func:`cadenza.pallas_kernels.attention_reference.reference_attention`
      without the cache.

    Returns:
      out float32 [B, T, Hq, D] (normalised within this part; zeros where the
      row sees nothing) and lse float32 [B, T, Hq] (``-inf`` where it sees nothing).
    """
    b, t, hq, d = q.shape
    mask = attention_mask(q_positions=q_positions, tail_mask=tail_mask, segment_ids=segment_ids,
                          window=window)
    s = masked_scores(q, k, mask, scale=scale, logit_soft_cap=logit_soft_cap)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask[:, None, None], jnp.exp(s - m), 0.0)
    total = jnp.sum(p, axis=-1, keepdims=True)
    seen = total > 0
    out = jnp.einsum("bkgts,bskd->btkgd", p / jnp.where(seen, total, 1.0), v.astype(jnp.float32))
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)[..., 0]
    return out.reshape(b, t, hq, d), lse.transpose(0, 3, 1, 2).reshape(b, t, hq)


def merge_parts(outs, lses):
    """Merge normalised partial attentions over disjoint key sets.

    Args:
      outs: sequence of float32 [..., D] partial outputs.
      lses: matching float32 [...] log-sum-exps (``-inf`` = the part saw nothing).

    Returns:
      float32 [..., D]: the attention over the union of the parts' keys; zeros
      where no part saw any key.
    """
    lse = jnp.stack(lses)
    m = jnp.max(lse, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - m_safe), 0.0)
    total = jnp.sum(w, axis=0)
    out = sum(wi[..., None] * oi for wi, oi in zip(w, outs))
    return out / jnp.where(total > 0, total, 1.0)[..., None]



def group_rows(q, q_positions, num_kv_heads: int, padded_rows: int, dtype):
    """Lay the query out as the cache kernels read it: per (batch row, kv head), the GQA
    group's ``g * T`` query rows ordered (group member, token), zero-padded to
    ``padded_rows``.

    Args: q [B, T, Hq, D] with Hq = g * num_kv_heads; q_positions int32 [B, T].

    Returns: q rows in ``dtype`` [B, Hkv, padded_rows, D] and their positions int32
      [B, padded_rows] (the same for every kv head; padding rows get position 0 and
      are dropped by :func:`ungroup_rows`).
    """
    b, t, hq, d = q.shape
    g, rows = hq // num_kv_heads, hq // num_kv_heads * t
    qr = q.reshape(b, t, num_kv_heads, g, d).transpose(0, 2, 3, 1, 4)
    qr = qr.reshape(b, num_kv_heads, rows, d)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, padded_rows - rows), (0, 0))).astype(dtype)
    qpos = jnp.pad(jnp.tile(q_positions.astype(jnp.int32), (1, g)),
                   ((0, 0), (0, padded_rows - rows)))
    return qr, qpos


def ungroup_rows(o, lse, t: int, g: int):
    """Inverse of :func:`group_rows` for per-split kernel outputs.

    Args: o float32 [B, Hkv, splits, padded_rows, D]; lse float32 [B, Hkv, splits,
      padded_rows]; T new tokens; g query heads per kv head.

    Returns: ``(outs, lses)``: [splits, B, T, Hq, D] and [splits, B, T, Hq] (see
      :func:`merge_parts`).
    """
    b, hkv, splits, _, d = o.shape
    rows = g * t
    o = o[:, :, :, :rows].reshape(b, hkv, splits, g, t, d).transpose(2, 0, 4, 1, 3, 5)
    lse = lse[:, :, :, :rows].reshape(b, hkv, splits, g, t).transpose(2, 0, 4, 1, 3)
    return o.reshape(splits, b, t, hkv * g, d), lse.reshape(splits, b, t, hkv * g)
