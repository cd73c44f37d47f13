"""Training/prefill flash attention on NVIDIA GPUs through cuDNN (jax.nn.dot_product_attention).

Covers causal self-attention (no cache) with GQA and a sliding window in
float16/bfloat16. Not covered: soft-capping, segment ids, custom masks among the
new tokens, float32, head_dim > 128 or not a multiple of 8; the dispatcher sends
soft-capping and packing to the Mosaic GPU kernel
(:mod:`cadenza.pallas_kernels.flash_attention_mosaic_gpu`).
"""

import jax
import jax.numpy as jnp


def unsupported_reason(q, *, tail_mask, segment_ids, logit_soft_cap):
    """Why cuDNN flash attention cannot take this case (None if it can)."""
    d = q.shape[-1]
    if tail_mask is not None:
        return "a custom mask among the new tokens"
    if segment_ids is not None:
        return "segment ids (packing)"
    if logit_soft_cap:
        return "logit soft-capping"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype} (cuDNN needs float16/bfloat16)"
    if d > 128 or d % 8:
        return f"head_dim {d}"
    return None


def flash_attention_cudnn(q, k, v, *, scale, window=0):
    """Causal attention via cuDNN. q [B,T,Hq,D], k/v [B,T,Hkv,D]; window a Python int."""
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True,
        local_window_size=(window - 1, 0) if window > 0 else None, implementation="cudnn")
