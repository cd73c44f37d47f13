"""Building blocks shared by the Mosaic GPU (Hopper) attention kernels.

Every matrix product goes through :func:`mma`: a warpgroup MMA (``wgmma``) with
both operands in SMEM, accumulating in float32 registers. Operands produced in
registers (probabilities, score gradients) are staged through an SMEM tile
first (:func:`stage`). That costs an SMEM round trip a tuned kernel would avoid
(``wgmma`` can take its left operand from registers), but it is the form both
the hardware lowering and Mosaic GPU interpret mode accept in jax 0.12, so the
same kernel body is what the CPU tests check and what an H100 would run.
"""

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

DTYPES = (jnp.bfloat16, jnp.float16)
ROWS = 64  # rows of one warpgroup MMA tile (M = 64)


def mma_transforms(dtype):
    """SMEM tiling + 128-byte swizzle for a ``wgmma`` operand tile of ``dtype``."""
    cols = 128 // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(128))


def mma_smem(shape, dtype):
    """An SMEM scratch type usable as a ``wgmma`` operand."""
    return plgpu.SMEM(shape, dtype, transforms=mma_transforms(dtype))


def mma(a, b):
    """``a @ b`` in float32 on the tensor cores; ``a`` [M, K] and ``b`` [K, N] SMEM refs
    (``ref.T`` for a transposed operand)."""

    def run(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

    return pl.run_scoped(run, plgpu.ACC((a.shape[0], b.shape[1]), jnp.float32))


def stage(smem, x):
    """Write register value ``x`` into ``smem`` (cast to its dtype), fenced for ``wgmma``."""
    smem[...] = x.astype(smem.dtype)
    plgpu.commit_smem()
    return smem


def soft_cap(s, cap):
    """``cap * tanh(s / cap)`` (identity when ``cap`` is 0) and its tanh (None when 0)."""
    if not cap:
        return s, None
    t = jnp.tanh(s / cap)
    return cap * t, t


def online_softmax_step(m_prev, l_prev, s, visible):
    """One block of the running softmax over rows of ``s`` [M, N] (float32).

    Returns ``(m_new, l_new, p, alpha)``: the new row maxima and sums, the block's
    unnormalised probabilities (0 where not ``visible``) and the factor that
    rescales everything accumulated before this block.
    """
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    return m_new, alpha * l_prev + jnp.sum(p, axis=1), p, alpha


def finish_softmax(m, total, acc):
    """Normalised output [M, D] and log-sum-exp [M] (zeros / ``-inf`` for empty rows)."""
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    return acc / safe[:, None], jnp.where(seen, m + jnp.log(safe), -jnp.inf)
