"""Verify/decode attention on NVIDIA Hopper (Pallas Mosaic GPU): few new tokens over a
ragged KV cache.

Same contract and split as the TPU kernel
(:mod:`cadenza.pallas_kernels.decode_attention_tpu`): the cache prefix is
attended by the kernel below, in ``num_splits`` chunks of the cache length
(flash-decoding) that each return ``(out, lse)``; the new tokens among
themselves ([T, T] tree/causal mask, segments, window) are attended in XLA;
:func:`cadenza.pallas_kernels.attention_parts.merge_parts` combines the parts.

Kernel layout: one program per (row, kv head x query-row block, split). All
query heads of a kv head (GQA group) and all T new tokens form the
``[G * T, D]`` query matrix, padded to blocks of 64 rows (one warpgroup MMA
tile). The program copies its query block into SMEM once, then loops over its
split's ``block_kv``-slot blocks *that lie below the row's length* (the loop
bound is computed from ``cache_lengths[b]``, so blocks past the length are
neither fetched nor computed): TMA copy of the K and V tiles into SMEM,
``q @ k^T`` on the tensor cores (``wgmma``), soft-cap, masking (slot beyond
the length, sliding window on positions), online softmax in float32, the
probabilities staged through SMEM for ``p @ v`` (``wgmma``).

What is proven where: the tests run this kernel in Mosaic GPU *interpret mode*
on CPU (``plgpu.InterpretGPUParams``), which checks its semantics (indexing,
masking, merging) against the XLA reference, and lower it for the CUDA
platform, which checks every operation has a Mosaic GPU lowering. Neither
measures speed, nor checks register pressure, SMEM capacity or ``ptxas`` on a
real H100: that needs a GPU (bench/kernels_attention.py). The kernel is simple
by design (no warp specialisation, no multi-buffering of K/V), so expect it
to be correct first and fast only after tuning on hardware.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from cadenza.pallas_kernels.attention_parts import (
    group_rows,
    merge_parts,
    tail_attention_with_lse,
    ungroup_rows,
)
from cadenza.pallas_kernels.attention_reference import _NEG
from cadenza.pallas_kernels.mosaic_gpu_parts import (
    DTYPES,
    ROWS,
    finish_softmax,
    mma,
    mma_smem,
    online_softmax_step,
    soft_cap,
    stage,
)

BLOCK_Q = ROWS   # query rows per program: one warpgroup MMA tile
BLOCK_KV_CHOICES = (128, 64)


def pick_block_kv(s):
    """Largest supported KV block dividing the cache length ``s`` (None if none)."""
    return next((bk for bk in BLOCK_KV_CHOICES if s % bk == 0), None)


def unsupported_reason(k_cache, *, block_kv=None, q_dtype=None):
    """Why the Mosaic GPU cache kernel cannot take these shapes (None if it can); an int8
    cache (codes) is read in ``q_dtype``, which must then be bfloat16/float16."""
    s, _, d = k_cache.shape[1:]
    dtype = q_dtype if k_cache.dtype == jnp.int8 else k_cache.dtype
    if dtype not in DTYPES:
        return (f"{'int8 cache read in ' if k_cache.dtype == jnp.int8 else 'cache dtype '}"
                f"{dtype} (the GPU kernel needs bfloat16/float16)")
    if d % 64 or d > 256:
        return f"head_dim {d} (the GPU kernel needs a multiple of 64, at most 256)"
    if block_kv is None and pick_block_kv(s) is None:
        return f"cache length {s} is not a multiple of 64"
    if block_kv is not None and s % block_kv:
        return f"cache length {s} is not a multiple of block_kv={block_kv}"
    return None


def _cache_kernel(lens_ref, win_ref, q_ref, qpos_ref, k_ref, v_ref, cpos_ref, *refs, scale,
                  cap, block_kv, blocks_per_split, row_blocks, quantized):
    if quantized:   # int8 K/V tiles + scales: converted into the bf16/f16 MMA tiles
        (ks_ref, vs_ref, o_ref, lse_ref, q_smem, qpos_smem, k_smem, v_smem, cpos_smem, p_smem,
         o_smem, lse_smem, barriers, k8_smem, v8_smem, ks_smem, vs_smem) = refs
    else:
        (o_ref, lse_ref, q_smem, qpos_smem, k_smem, v_smem, cpos_smem, p_smem, o_smem,
         lse_smem, barriers) = refs
    b = lax.axis_index("b")
    head_rows = lax.axis_index("hr")
    split = lax.axis_index("split")
    h, rb = head_rows // row_blocks, head_rows % row_blocks
    length = lens_ref[b]
    window = win_ref[0]
    rows = pl.ds(rb * BLOCK_Q, BLOCK_Q)

    plgpu.copy_gmem_to_smem(q_ref.at[b, h, rows], q_smem, barriers.at[0])
    plgpu.copy_gmem_to_smem(qpos_ref.at[b, rows], qpos_smem, barriers.at[1])
    plgpu.barrier_wait(barriers.at[0])
    plgpu.barrier_wait(barriers.at[1])
    qpos = qpos_smem[...]

    first = split * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, pl.cdiv(length, block_kv))

    def step(i, carry):
        m_prev, l_prev, acc = carry
        slots = pl.ds(i * block_kv, block_kv)
        if quantized:
            plgpu.copy_gmem_to_smem(k_ref.at[b, slots, h], k8_smem, barriers.at[2])
            plgpu.copy_gmem_to_smem(v_ref.at[b, slots, h], v8_smem, barriers.at[3])
            plgpu.copy_gmem_to_smem(ks_ref.at[b, h, slots], ks_smem, barriers.at[5])
            plgpu.copy_gmem_to_smem(vs_ref.at[b, h, slots], vs_smem, barriers.at[6])
        else:
            plgpu.copy_gmem_to_smem(k_ref.at[b, slots, h], k_smem, barriers.at[2])
            plgpu.copy_gmem_to_smem(v_ref.at[b, slots, h], v_smem, barriers.at[3])
        plgpu.copy_gmem_to_smem(cpos_ref.at[b, slots], cpos_smem, barriers.at[4])
        plgpu.barrier_wait(barriers.at[2])
        plgpu.barrier_wait(barriers.at[4])
        if quantized:   # codes convert exactly; q.(c * scale_j) = (q.c) * scale_j
            stage(k_smem, k8_smem[...])
            plgpu.barrier_wait(barriers.at[5])

        s = mma(q_smem, k_smem.T) * scale
        if quantized:
            s = s * ks_smem[...][None, :]
        s, _ = soft_cap(s, cap)
        col = i * block_kv + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        near = qpos[:, None] - cpos_smem[...][None, :] < window
        visible = (col < length) & ((window <= 0) | near)
        m_new, l_new, p, alpha = online_softmax_step(m_prev, l_prev, jnp.where(visible, s, _NEG),
                                                     visible)
        plgpu.barrier_wait(barriers.at[3])
        if quantized:   # sum_j p_j (c_j * scale_j): the scales go on the probabilities
            plgpu.barrier_wait(barriers.at[6])
            stage(v_smem, v8_smem[...])
            p = p * vs_smem[...][None, :]
        stage(p_smem, p)
        return m_new, l_new, alpha[:, None] * acc + mma(p_smem, v_smem)

    d = q_smem.shape[-1]
    init = (jnp.full((BLOCK_Q,), _NEG, jnp.float32), jnp.zeros((BLOCK_Q,), jnp.float32),
            jnp.zeros((BLOCK_Q, d), jnp.float32))
    m, total, acc = lax.fori_loop(first, jnp.maximum(last, first), step, init)
    o_smem[...], lse_smem[...] = finish_softmax(m, total, acc)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, split, rows])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, split, rows])
    plgpu.wait_smem_to_gmem(0)


def cache_attention_gpu(q, k_cache, v_cache, *, cache_lengths, cache_positions, q_positions,
                        scale, window=0, logit_soft_cap=0.0, block_kv=None, num_splits=None,
                        interpret=None, k_scale=None, v_scale=None):
    """Attention of the new tokens over the valid cache prefix only (the Mosaic GPU part).

    Args:
      q: [B, T, Hq, D]. k_cache, v_cache: [B, S, Hkv, D] bfloat16/float16
        (see :func:`unsupported_reason`); q is cast to the cache dtype. Or int8 codes with
        ``k_scale``/``v_scale`` float32 [B, S, Hkv]: the kernel copies the int8 tiles and
        converts them into q's dtype (bfloat16/float16) in SMEM.
      cache_lengths: int32 [B]; cache_positions: int32 [B, S]; q_positions: int32 [B, T].
      window: int or int32 scalar (0 = unlimited; traced values are fine).
      block_kv: KV slots per loop step (default: largest of 128/64 dividing S).
      num_splits: KV chunks computed by separate programs and merged (default:
        enough to give about 4 programs per streaming multiprocessor of an
        H100 for the given batch and heads, at most one per block).
      interpret: None on a GPU; ``plgpu.InterpretGPUParams()`` to run on CPU.

    Returns:
      ``(outs, lses)``: per split, float32 [B, T, Hq, D] and [B, T, Hq] (see merge_parts).
    """
    b, t, hq, d = q.shape
    s, hkv = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    block_kv = block_kv or pick_block_kv(s)
    n_blocks = s // block_kv
    rows = g * t
    row_blocks = -(-rows // BLOCK_Q)
    r = row_blocks * BLOCK_Q
    if num_splits is None:
        num_splits = max(1, (4 * 132) // (b * hkv * row_blocks))
    num_splits = max(1, min(num_splits, n_blocks))
    bps = -(-n_blocks // num_splits)
    quantized = k_scale is not None
    dtype = q.dtype if quantized else k_cache.dtype
    # rows ordered (group member, token); padded to whole row blocks
    qr, qpos = group_rows(q, q_positions, hkv, r, dtype)
    lens = cache_lengths.astype(jnp.int32)
    win = jnp.asarray(window, jnp.int32).reshape(1)
    kernel = functools.partial(_cache_kernel, scale=float(scale),
                               cap=float(logit_soft_cap or 0.0), block_kv=block_kv,
                               blocks_per_split=bps, row_blocks=row_blocks,
                               quantized=quantized)
    scales, int8_scratch = [], []
    if quantized:   # scales as [B, Hkv, S]: one contiguous row of block_kv per tile
        scales = [jnp.transpose(x.astype(jnp.float32), (0, 2, 1)) for x in (k_scale, v_scale)]
        int8_scratch = [plgpu.SMEM((block_kv, d), jnp.int8), plgpu.SMEM((block_kv, d), jnp.int8),
                        plgpu.SMEM((block_kv,), jnp.float32),
                        plgpu.SMEM((block_kv,), jnp.float32)]
    o, lse = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((b, hkv, num_splits, r, d), jnp.float32),
                  jax.ShapeDtypeStruct((b, hkv, num_splits, r), jnp.float32)),
        scratch_types=[
            mma_smem((BLOCK_Q, d), dtype),              # q
            plgpu.SMEM((BLOCK_Q,), jnp.int32),          # q positions
            mma_smem((block_kv, d), dtype),             # k
            mma_smem((block_kv, d), dtype),             # v
            plgpu.SMEM((block_kv,), jnp.int32),         # cache positions
            mma_smem((BLOCK_Q, block_kv), dtype),       # probabilities
            plgpu.SMEM((BLOCK_Q, d), jnp.float32),      # out
            plgpu.SMEM((BLOCK_Q,), jnp.float32),        # lse
            plgpu.Barrier(num_barriers=7 if quantized else 5),
        ] + int8_scratch,
        grid=(b, hkv * row_blocks, num_splits),
        grid_names=("b", "hr", "split"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(lens, win, qr, qpos, k_cache, v_cache, cache_positions.astype(jnp.int32), *scales)
    outs, lses = ungroup_rows(o, lse, t, g)
    return list(outs), list(lses)


def decode_attention_gpu(q, k, v, *, scale, q_positions, k_cache, v_cache, cache_lengths,
                         cache_positions, tail_mask=None, segment_ids=None, window=0,
                         logit_soft_cap=0.0, block_kv=None, num_splits=None, interpret=None,
                         k_scale=None, v_scale=None):
    """Verify/decode attention over a cache: Mosaic GPU over the cache, the new tokens
    among themselves in XLA, merged by log-sum-exp.

    Same arguments and result as
    :func:`cadenza.pallas_kernels.attention_reference.reference_attention` with a
    cache (plus the kernel's ``block_kv``, ``num_splits``, ``interpret``), including an
    int8 cache given as codes with ``k_scale``/``v_scale``.
    Forward only (decoding); not differentiable.
    """
    outs, lses = cache_attention_gpu(
        q, k_cache, v_cache, cache_lengths=cache_lengths, cache_positions=cache_positions,
        q_positions=q_positions, scale=scale, window=window, logit_soft_cap=logit_soft_cap,
        block_kv=block_kv, num_splits=num_splits, interpret=interpret, k_scale=k_scale,
        v_scale=v_scale)
    tail_out, tail_lse = tail_attention_with_lse(
        q, k, v, scale=scale, q_positions=q_positions, tail_mask=tail_mask,
        segment_ids=segment_ids, window=window, logit_soft_cap=logit_soft_cap)
    return merge_parts(outs + [tail_out], lses + [tail_lse]).astype(q.dtype)
