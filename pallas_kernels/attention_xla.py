"""Plain-XLA attention over the new tokens alone (no KV cache), with a hand-written VJP.

Same visibility rule and the same math as
:func:`cadenza.pallas_kernels.attention_reference.reference_attention` (without a cache
and without a logit soft-cap), arranged for speed where no kernel applies (training and
prefill on CPU, or ``model.attention_impl=xla``):

- the softmax is normalised after the probabilities meet the values (the [.., T, D]
  output is divided by the row sums instead of the [.., T, S] probabilities);
- the backward pass reuses the forward's unnormalised probabilities and writes the
  scores' gradient in one elementwise pass, instead of autodiff's chain of selects,
  broadcasts and transposed copies of [B, H, T, S] arrays (the 10M model's train step
  spent about a quarter of its CPU time in attention, three fifths of it outside the
  attention matmuls).

Values equal the reference's within float rounding (the division moves).
"""

import jax
import jax.numpy as jnp

from cadenza.pallas_kernels.attention_reference import attention_mask


def xla_attention(q, k, v, *, scale, q_positions, tail_mask=None, segment_ids=None, window=0):
    """Softmax attention of the new tokens among themselves, differentiable in q, k, v.

    Args:
      q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] (Hq % Hkv == 0: GQA).
      scale: multiplier on q.k scores (a number or a scalar array).
      Other arguments: see :func:`~cadenza.pallas_kernels.attention_reference.attention_mask`.

    Returns [B, T, Hq, D] in q's dtype; scores, softmax and gradients accumulate in float32.
    A query that sees nothing gets zeros (and zero gradients), never NaN.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    mask = attention_mask(q_positions=q_positions, tail_mask=tail_mask, segment_ids=segment_ids,
                          window=window)
    # Heads-major layouts, so every matmul below is a plain batched one (cheaper on XLA CPU
    # than letting the einsums pick transposes of the [.., T, S] arrays).
    # The G query heads of a KV head are one block of G * T rows.
    g = hq // hkv
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, hkv, g, d).transpose(
        0, 2, 3, 1, 4).reshape(b, hkv, g * t, d)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)   # [B, Hkv, S, D]
    rows_mask = jnp.broadcast_to(mask[:, None], (b, g, t, mask.shape[-1])).reshape(
        b, 1, g * t, mask.shape[-1])
    out = _attend(qh, kh, vh, rows_mask)                  # [B, Hkv, G * T, D]
    return out.reshape(b, hkv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d)


def _forward(qh, kh, vh, visible):
    # qh: [B, Hkv, R, D] (R = G * T rows); kh, vh: [B, Hkv, S, D]; visible: [B, 1, R, S].
    s = jnp.einsum("bkrd,bksd->bkrs", qh, kh, preferred_element_type=jnp.float32)
    top = jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1, keepdims=True)
    e = jnp.where(visible, jnp.exp(s - top), 0.0)         # unnormalised probabilities
    total = jnp.sum(e, axis=-1, keepdims=True)
    inv = jnp.where(total > 0, 1.0 / total, 0.0)          # [B, Hkv, R, 1]
    o = jnp.einsum("bkrs,bksd->bkrd", e.astype(vh.dtype), vh,
                   preferred_element_type=jnp.float32) * inv
    return o.astype(qh.dtype), (qh, kh, vh, e, inv, o)


@jax.custom_vjp
def _attend(qh, kh, vh, visible):
    return _forward(qh, kh, vh, visible)[0]


def _attend_bwd(res, g):
    # p = e * inv (the probabilities), o = p @ v:
    # dv = p^T @ g; dp = g @ v^T; ds = p * (dp - rowsum(g * o)); dq = ds @ k; dk = ds^T @ q.
    qh, kh, vh, e, inv, o = res
    f32 = jnp.float32
    g = g.astype(f32)
    gs = g * inv                                          # the 1/rowsum moved onto g
    dv = jnp.einsum("bkrs,bkrd->bksd", e.astype(vh.dtype), gs.astype(vh.dtype),
                    preferred_element_type=f32)
    dp = jnp.einsum("bkrd,bksd->bkrs", gs.astype(vh.dtype), vh, preferred_element_type=f32)
    delta = jnp.sum(g * o, axis=-1, keepdims=True) * inv
    ds = (e * (dp - delta)).astype(qh.dtype)
    dq = jnp.einsum("bkrs,bksd->bkrd", ds, kh, preferred_element_type=f32)
    dk = jnp.einsum("bkrs,bkrd->bksd", ds, qh, preferred_element_type=f32)
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None


_attend.defvjp(_forward, _attend_bwd)
