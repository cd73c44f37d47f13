"""Training/prefill flash attention on TPU: the upstream splash attention kernel, wrapped.

Covers causal attention of a whole sequence over itself (no cache) with GQA,
segment ids (packing), a sliding window and logit soft-capping, forward and
backward (splash's own custom VJP). Masks are static in splash, so the window
must be a Python int here; the dispatcher turns a per-layer traced window into
a ``lax.switch`` over the model's few distinct windows.

Window semantics: splash measures the window in token index within the row
(``i - j < window``); the reference measures it in positions. They agree when
positions are consecutive within each segment, which holds for the model's
default positions and for packed batches (positions restart per segment).
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

BLOCK_CHOICES = (512, 256, 128)


def pick_block(t):
    """Largest splash block size dividing the sequence length ``t`` (None if none)."""
    return next((bk for bk in BLOCK_CHOICES if t % bk == 0), None)


def unsupported_reason(q, *, tail_mask):
    """Why splash cannot take this case (None if it can)."""
    if tail_mask is not None:
        return "a custom mask among the new tokens (splash masks are static)"
    if pick_block(q.shape[1]) is None:
        return f"sequence length {q.shape[1]} is not a multiple of 128"
    return None


def _kernel(t, group, window, soft_cap, block, interpret, save_residuals=False):
    if window > 0:
        one = splash.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    else:
        one = splash.CausalMask((t, t))
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa_single_device(
        splash.MultiHeadMask([one] * group), block_sizes=sizes,
        attn_logits_soft_cap=soft_cap or None, interpret=interpret,
        save_residuals=save_residuals)


def flash_attention_tpu(q, k, v, *, scale, segment_ids=None, window=0, logit_soft_cap=0.0,
                        block=None, interpret=False, return_lse=False):
    """Causal flash attention (splash) of a sequence over itself; differentiable.

    Args:
      q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] with Hq % Hkv == 0 and T % block == 0.
      scale: multiplier on q.k (applied to q in float32 before the kernel).
      segment_ids: int32 [B, T] or None.
      window: Python int, 0 = unlimited (see the module note on positions).
      logit_soft_cap: 0 = off.
      block: splash block size (default: largest of 512/256/128 dividing T).
      interpret: Pallas interpret mode (CPU tests; use inside
        ``pltpu.force_tpu_interpret_mode()``).

      return_lse: also return the log-sum-exp (forward only, not differentiable),
        to merge with attention over a cache prefix.

    Returns:
      [B, T, Hq, D] in q's dtype; with ``return_lse`` also float32 [B, T, Hq].
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    kernel = _kernel(t, g, int(window), float(logit_soft_cap or 0.0), block or pick_block(t),
                     interpret, save_residuals=return_lse)
    qh = (q.astype(jnp.float32) * scale).astype(q.dtype)
    qh = qh.reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if segment_ids is None:
        per_head = jax.vmap(kernel)
        out = jax.vmap(per_head)(qh, kh, vh)
    else:
        seg = segment_ids.astype(jnp.int32)
        per_head = jax.vmap(lambda qq, kk, vv, s: kernel(qq, kk, vv, segment_ids=s),
                            in_axes=(0, 0, 0, None))
        out = jax.vmap(per_head)(qh, kh, vh, splash.SegmentIds(q=seg, kv=seg))
    if return_lse:
        out, (lse,) = out
        lse = lse.astype(jnp.float32).transpose(0, 3, 1, 2).reshape(b, t, hq)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q.dtype), lse
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q.dtype)
