"""Training/prefill flash attention on NVIDIA Hopper (Pallas Mosaic GPU), forward and backward.

For what cuDNN (:mod:`cadenza.pallas_kernels.flash_attention_cudnn`) does not
cover: logit soft-capping, and segment ids (packing) together with a sliding
window; also causal and GQA. Exactly the reference's visibility rule for a
sequence over itself: key ``j`` visible to query ``i`` iff ``j <= i``, same
segment, and (``window > 0``) ``q_pos[i] - q_pos[j] < window``.

Forward: one program per (row, query head, 64-query block); it loops over the
key blocks up to the diagonal (blocks above it are skipped; window and segment
masks are applied per element, blocks outside them are masked, not skipped),
``wgmma`` for ``q k^T`` and ``p v``, online softmax in float32, and writes the
output and its log-sum-exp. Backward (FlashAttention-2 style, from the saved
log-sum-exp): one kernel for dq (per query block, loop over key blocks) and
one for dk/dv (per key block and kv head, loop over the group's query heads
and the query blocks from the diagonal on), so no atomics are needed.

Tested in Mosaic GPU interpret mode on CPU and lowered for CUDA (see
tests/test_kernels_gpu.py): that proves the semantics and that each operation
has a Mosaic GPU lowering, not speed nor register/SMEM fit on a real H100.
The kernels are deliberately plain (no warp specialisation, no K/V
multi-buffering, register operands staged through SMEM), so their speed is
unmeasured and likely below cuDNN until tuned on hardware.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from cadenza.pallas_kernels import mosaic_gpu_parts as mg
from cadenza.pallas_kernels.attention_reference import _NEG

BLOCK = mg.ROWS   # query and key rows per block


def unsupported_reason(q, *, tail_mask):
    """Why the Mosaic GPU flash kernel cannot take this case (None if it can)."""
    t, d = q.shape[1], q.shape[-1]
    if tail_mask is not None:
        return "a custom mask among the new tokens"
    if q.dtype not in mg.DTYPES:
        return f"dtype {q.dtype} (the GPU kernel needs bfloat16/float16)"
    if t % BLOCK:
        return f"sequence length {t} is not a multiple of {BLOCK}"
    if d % 64 or d > 256:
        return f"head_dim {d} (the GPU kernel needs a multiple of 64, at most 256)"
    return None


def _visible(q_start, k_start, q_seg, k_seg, q_pos, k_pos, *, q_axis, window):
    """Mask of one [BLOCK, BLOCK] block; queries along ``q_axis`` (0, or 1 for a transposed
    block whose rows are keys). ``*_start``: first index; ``*_seg``/``*_pos``: [BLOCK]."""
    def along(x, axis):
        return x[:, None] if axis == 0 else x[None, :]

    shape = (BLOCK, BLOCK)
    k_axis = 1 - q_axis
    qi = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
    ki = k_start + lax.broadcasted_iota(jnp.int32, shape, k_axis)
    vis = (ki <= qi) & (along(q_seg, q_axis) == along(k_seg, k_axis))
    if window > 0:
        vis = vis & (along(q_pos, q_axis) - along(k_pos, k_axis) < window)
    return vis


def _load_block(refs, smems, barrier, b, idx):
    """TMA-copy ``refs[i].at[b, idx...]`` into ``smems[i]`` on one barrier per copy."""
    for i, (ref, smem) in enumerate(zip(refs, smems)):
        plgpu.copy_gmem_to_smem(ref.at[(b, *idx[i])], smem, barrier.at[i])
    for i in range(len(refs)):
        plgpu.barrier_wait(barrier.at[i])


def _scores(a_smem, b_smem, *, scale, cap):
    """Soft-capped scores ``a @ b^T * scale`` and the tanh (None without a cap)."""
    return mg.soft_cap(mg.mma(a_smem, b_smem.T) * scale, cap)


def _fwd_kernel(q_ref, k_ref, v_ref, seg_ref, pos_ref, o_ref, lse_ref,
                q_smem, k_smem, v_smem, qs_smem, qp_smem, ks_smem, kp_smem, p_smem, o_smem,
                lse_smem, q_bar, kv_bar, *, scale, cap, window, group):
    b, h, qb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("qb")
    kh = h // group
    rows = pl.ds(qb * BLOCK, BLOCK)
    _load_block((q_ref, seg_ref, pos_ref), (q_smem, qs_smem, qp_smem), q_bar, b,
                ((rows, h), (rows,), (rows,)))
    q_seg, q_pos = qs_smem[...], qp_smem[...]

    def step(j, carry):
        m_prev, l_prev, acc = carry
        cols = pl.ds(j * BLOCK, BLOCK)
        _load_block((k_ref, v_ref, seg_ref, pos_ref), (k_smem, v_smem, ks_smem, kp_smem),
                    kv_bar, b, ((cols, kh), (cols, kh), (cols,), (cols,)))
        s, _ = _scores(q_smem, k_smem, scale=scale, cap=cap)
        vis = _visible(qb * BLOCK, j * BLOCK, q_seg, ks_smem[...], q_pos, kp_smem[...],
                       q_axis=0, window=window)
        m_new, l_new, p, alpha = mg.online_softmax_step(m_prev, l_prev,
                                                        jnp.where(vis, s, _NEG), vis)
        return m_new, l_new, alpha[:, None] * acc + mg.mma(mg.stage(p_smem, p), v_smem)

    d = q_smem.shape[-1]
    init = (jnp.full((BLOCK,), _NEG, jnp.float32), jnp.zeros((BLOCK,), jnp.float32),
            jnp.zeros((BLOCK, d), jnp.float32))
    m, total, acc = lax.fori_loop(0, qb + 1, step, init)
    out, lse = mg.finish_softmax(m, total, acc)
    o_smem[...] = out.astype(o_smem.dtype)
    lse_smem[...] = lse
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, rows, h])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, rows])
    plgpu.wait_smem_to_gmem(0)


def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, pos_ref, do_ref, lse_ref, delta_ref, dq_ref,
               q_smem, do_smem, k_smem, v_smem, qs_smem, qp_smem, lse_smem, delta_smem,
               ks_smem, kp_smem, ds_smem, dq_smem, q_bar, kv_bar, *, scale, cap, window, group):
    b, h, qb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("qb")
    kh = h // group
    rows = pl.ds(qb * BLOCK, BLOCK)
    _load_block((q_ref, do_ref, seg_ref, pos_ref, lse_ref, delta_ref),
                (q_smem, do_smem, qs_smem, qp_smem, lse_smem, delta_smem), q_bar, b,
                ((rows, h), (rows, h), (rows,), (rows,), (h, rows), (h, rows)))
    q_seg, q_pos = qs_smem[...], qp_smem[...]
    lse, delta = lse_smem[...], delta_smem[...]

    def step(j, dq):
        cols = pl.ds(j * BLOCK, BLOCK)
        _load_block((k_ref, v_ref, seg_ref, pos_ref), (k_smem, v_smem, ks_smem, kp_smem),
                    kv_bar, b, ((cols, kh), (cols, kh), (cols,), (cols,)))
        s, tanh = _scores(q_smem, k_smem, scale=scale, cap=cap)
        vis = _visible(qb * BLOCK, j * BLOCK, q_seg, ks_smem[...], q_pos, kp_smem[...],
                       q_axis=0, window=window)
        p = jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)
        ds = p * (mg.mma(do_smem, v_smem.T) - delta[:, None])
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        return dq + mg.mma(mg.stage(ds_smem, ds), k_smem)

    dq = lax.fori_loop(0, qb + 1, step, jnp.zeros(q_smem.shape, jnp.float32))
    dq_smem[...] = (dq * scale).astype(dq_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[b, rows, h])
    plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(q_ref, k_ref, v_ref, seg_ref, pos_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref,
                k_smem, v_smem, q_smem, do_smem, ks_smem, kp_smem, qs_smem, qp_smem, lse_smem,
                delta_smem, p_smem, ds_smem, dk_smem, dv_smem, k_bar, q_bar,
                *, scale, cap, window, group, q_blocks):
    b, kh, kb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("kb")
    cols = pl.ds(kb * BLOCK, BLOCK)
    _load_block((k_ref, v_ref, seg_ref, pos_ref), (k_smem, v_smem, ks_smem, kp_smem), k_bar, b,
                ((cols, kh), (cols, kh), (cols,), (cols,)))
    k_seg, k_pos = ks_smem[...], kp_smem[...]

    def step(n, carry):
        dk, dv = carry
        h = kh * group + n // (q_blocks - kb)
        i = kb + n % (q_blocks - kb)
        rows = pl.ds(i * BLOCK, BLOCK)
        _load_block((q_ref, do_ref, seg_ref, pos_ref, lse_ref, delta_ref),
                    (q_smem, do_smem, qs_smem, qp_smem, lse_smem, delta_smem), q_bar, b,
                    ((rows, h), (rows, h), (rows,), (rows,), (h, rows), (h, rows)))
        # transposed block: rows are keys, columns are queries
        s_t, tanh = _scores(k_smem, q_smem, scale=scale, cap=cap)
        vis = _visible(i * BLOCK, kb * BLOCK, qs_smem[...], k_seg, qp_smem[...], k_pos,
                       q_axis=1, window=window)
        p_t = jnp.where(vis, jnp.exp(s_t - lse_smem[...][None, :]), 0.0)
        dv = dv + mg.mma(mg.stage(p_smem, p_t), do_smem)
        ds_t = p_t * (mg.mma(v_smem, do_smem.T) - delta_smem[...][None, :])
        if tanh is not None:
            ds_t = ds_t * (1.0 - tanh * tanh)
        return dk + mg.mma(mg.stage(ds_smem, ds_t), q_smem), dv

    zeros = jnp.zeros(k_smem.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group * (q_blocks - kb), step, (zeros, zeros))
    dk_smem[...] = (dk * scale).astype(dk_smem.dtype)
    dv_smem[...] = dv.astype(dv_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dk_smem, dk_ref.at[b, cols, kh])
    plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[b, cols, kh])
    plgpu.wait_smem_to_gmem(0)


def _vec(dtype=jnp.int32):
    return plgpu.SMEM((BLOCK,), dtype)


def _forward(q, k, v, seg, pos, *, scale, cap, window, interpret):
    b, t, hq, d = q.shape
    group = hq // k.shape[2]
    tile = mg.mma_smem((BLOCK, d), q.dtype)
    kernel = functools.partial(_fwd_kernel, scale=scale, cap=cap, window=window, group=group)
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct((b, hq, t), jnp.float32)),
        scratch_types=[tile, tile, tile, _vec(), _vec(), _vec(), _vec(),
                       mg.mma_smem((BLOCK, BLOCK), q.dtype), plgpu.SMEM((BLOCK, d), q.dtype),
                       _vec(jnp.float32), plgpu.Barrier(num_barriers=3),
                       plgpu.Barrier(num_barriers=4)],
        grid=(b, hq, t // BLOCK), grid_names=("b", "h", "qb"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(q, k, v, seg, pos)


def _backward(q, k, v, seg, pos, out, lse, do, *, scale, cap, window, interpret):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), out.astype(jnp.float32))
    do = do.astype(q.dtype)
    tile = mg.mma_smem((BLOCK, d), q.dtype)
    square = mg.mma_smem((BLOCK, BLOCK), q.dtype)
    kw = dict(scale=scale, cap=cap, window=window, group=group)
    params = plgpu.CompilerParams(approx_math=True)
    args = (q, k, v, seg, pos, do, lse, delta)
    dq = plgpu.kernel(
        functools.partial(_dq_kernel, **kw),
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_types=[tile, tile, tile, tile, _vec(), _vec(), _vec(jnp.float32),
                       _vec(jnp.float32), _vec(), _vec(), square,
                       plgpu.SMEM((BLOCK, d), q.dtype), plgpu.Barrier(num_barriers=6),
                       plgpu.Barrier(num_barriers=4)],
        grid=(b, hq, t // BLOCK), grid_names=("b", "h", "qb"),
        compiler_params=params, interpret=interpret,
    )(*args)
    dk, dv = plgpu.kernel(
        functools.partial(_dkv_kernel, **kw, q_blocks=t // BLOCK),
        out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype),
                  jax.ShapeDtypeStruct(v.shape, v.dtype)),
        scratch_types=[tile, tile, tile, tile, _vec(), _vec(), _vec(), _vec(),
                       _vec(jnp.float32), _vec(jnp.float32), square, square,
                       plgpu.SMEM((BLOCK, d), k.dtype), plgpu.SMEM((BLOCK, d), v.dtype),
                       plgpu.Barrier(num_barriers=4), plgpu.Barrier(num_barriers=6)],
        grid=(b, hkv, t // BLOCK), grid_names=("b", "h", "kb"),
        compiler_params=params, interpret=interpret,
    )(*args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, seg, pos, scale, cap, window, interpret):
    return _forward(q, k, v, seg, pos, scale=scale, cap=cap, window=window,
                    interpret=interpret)[0]


def _flash_fwd(q, k, v, seg, pos, scale, cap, window, interpret):
    out, lse = _forward(q, k, v, seg, pos, scale=scale, cap=cap, window=window,
                        interpret=interpret)
    return out, (q, k, v, seg, pos, out, lse)


def _flash_bwd(scale, cap, window, interpret, res, do):
    q, k, v, seg, pos, out, lse = res
    dq, dk, dv = _backward(q, k, v, seg, pos, out, lse, do, scale=scale, cap=cap,
                           window=window, interpret=interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention_mosaic_gpu(q, k, v, *, scale, q_positions, segment_ids=None, window=0,
                               logit_soft_cap=0.0, interpret=None):
    """Causal flash attention of a sequence over itself; differentiable (custom VJP).

    Args:
      q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; bfloat16/float16, Hq % Hkv == 0,
        T % 64 == 0 (see :func:`unsupported_reason`).
      scale: multiplier on q.k scores.
      q_positions: int32 [B, T]: the window is measured on them, as in the reference.
      segment_ids: int32 [B, T] or None.
      window: Python int, 0 = unlimited.
      logit_soft_cap: 0 = off.
      interpret: None on a GPU; ``plgpu.InterpretGPUParams()`` to run on CPU.

    Returns:
      [B, T, Hq, D] in q's dtype (float32 softmax inside). Gradients flow to q, k, v.
    """
    seg = (jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    return _flash(q, k, v, seg, q_positions.astype(jnp.int32), float(scale),
                  float(logit_soft_cap or 0.0), int(window), interpret)
