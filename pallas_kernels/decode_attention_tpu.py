"""Verify/decode attention on TPU (Pallas Mosaic TPU): few new tokens over a ragged KV cache.

The contract is the model's: the new tokens' keys/values arrive separately
from the cache (cache slots ``>= cache_lengths[b]`` are garbage, including
the slots the model is about to write). So the op is computed in two parts
merged exactly by log-sum-exp (:mod:`cadenza.pallas_kernels.attention_parts`):

- the cache prefix, by the kernel below: the cache length is split into
  ``num_splits`` chunks (flash-decoding) and each chunk is an online-softmax
  loop over ``block_kv`` slots; blocks at or beyond a row's length are neither
  fetched (the index map clamps to the row's last valid block, so the
  pipeline does not re-copy) nor computed;
- the new tokens among themselves ([T, T] tree/causal mask, segments,
  window), in XLA: for verify (T <= 64) a few hundred FLOPs per head; long
  causal prefill chunks use splash attention with its log-sum-exp instead.

Layout: the cache is read in place as ``[B, S, Hkv * D]`` (a free reshape),
one ``[block_kv, D]`` tile per (row, kv head, block), so ``D`` must be a
multiple of 128 (or the model must have one kv head). All query heads of a
kv head (GQA group) and all T new tokens form one ``[G * T, D]`` matrix.

An int8 cache is read as int8 tiles plus a ``[1, block_kv]`` float32 row of
scales per tile (scales laid out ``[B, Hkv, 1, S]``): the codes convert
exactly to the query dtype, the key scales multiply the scores' columns and
the value scales the probabilities, so no dequantised tile is ever written.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cadenza.pallas_kernels.attention_parts import (
    group_rows,
    merge_parts,
    tail_attention_with_lse,
    ungroup_rows,
)
from cadenza.pallas_kernels.attention_reference import _NEG
from cadenza.pallas_kernels.flash_attention_tpu import flash_attention_tpu

BLOCK_KV_CHOICES = (512, 256, 128)
BLOCK_Q = 512  # query rows (GQA group x new tokens) per grid step


def unsupported_reason(k_cache, *, block_kv=None):
    """Why the TPU cache kernel cannot take these shapes (None if it can)."""
    s, hkv, d = k_cache.shape[1:]
    if d % 128 and hkv != 1:
        return f"head_dim {d} is not a multiple of 128"
    if block_kv is None and pick_block_kv(s) is None:
        return f"cache length {s} is not a multiple of 128"
    if block_kv is not None and s % block_kv:
        return f"cache length {s} is not a multiple of block_kv={block_kv}"
    return None


def pick_block_kv(s):
    """Largest supported KV block dividing the cache length ``s`` (None if none)."""
    return next((bk for bk in BLOCK_KV_CHOICES if s % bk == 0), None)


def _cache_kernel(lens_ref, win_ref, q_ref, qpos_ref, k_ref, v_ref, cpos_ref, *refs, scale,
                  soft_cap, block_kv, blocks_per_split, quantized):
    if quantized:   # int8 tiles: scales [1, block_kv] per tile of K and of V
        ks_ref, vs_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    b, split, i = pl.program_id(0), pl.program_id(3), pl.program_id(4)
    start = (split * blocks_per_split + i) * block_kv
    length = lens_ref[b]

    @pl.when(i == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(start < length)
    def _compute():
        q = q_ref[...]
        # int8 codes convert exactly to the query dtype; q.(c * scale_j) = (q.c) * scale_j
        s = jax.lax.dot_general(q, k_ref[...].astype(q.dtype), (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * scale
        if quantized:
            s = s * ks_ref[...]
        if soft_cap:
            s = soft_cap * jnp.tanh(s / soft_cap)
        col = start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        window = win_ref[0]
        visible = (col < length) & ((window <= 0) | (qpos_ref[...] - cpos_ref[...] < window))
        s = jnp.where(visible, s, _NEG)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        pv = p * vs_ref[...] if quantized else p   # sum_j p_j (c_j * scale_j)
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(pv.astype(q.dtype), v_ref[...].astype(q.dtype),
                                                    preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(i == blocks_per_split - 1)
    def _finish():
        total = l_sc[...]
        seen = total > 0
        o_ref[...] = acc_sc[...] / jnp.where(seen, total, 1.0)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(jnp.where(seen, total, 1.0)),
                                 -jnp.inf)


def cache_attention_tpu(q, k_cache, v_cache, *, cache_lengths, cache_positions, q_positions,
                        scale, window=0, logit_soft_cap=0.0, block_kv=None, num_splits=None,
                        interpret=False, k_scale=None, v_scale=None):
    """Attention of the new tokens over the valid cache prefix only (the Pallas part).

    Args:
      q: [B, T, Hq, D]. k_cache, v_cache: [B, S, Hkv, D] (S % block_kv == 0): values in
        a float dtype, or int8 codes with ``k_scale``/``v_scale`` float32 [B, S, Hkv]
        (the kernel reads the int8 tiles and their scales; the matmuls run in q's dtype).
      cache_lengths: int32 [B]; cache_positions: int32 [B, S]; q_positions: int32 [B, T].
      window: int or int32 scalar (0 = unlimited; traced values are fine).
      block_kv: KV slots per grid step (default: largest of 512/256/128 dividing S).
      num_splits: KV chunks computed independently and merged (default: 2 if
        there are at least 2 blocks, else 1).
      interpret: False on TPU; on CPU ``True`` (generic Pallas interpret mode, pure:
        usable under scans) or ``pltpu.InterpretParams()`` (TPU interpret mode,
        which simulates TPU memory semantics but is effectful).

    Returns:
      ``(outs, lses)``: per split, float32 [B, T, Hq, D] and [B, T, Hq] (see merge_parts).
    """
    b, t, hq, d = q.shape
    s, hkv = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    block_kv = block_kv or pick_block_kv(s)
    n_blocks = s // block_kv
    num_splits = num_splits or (2 if n_blocks >= 2 else 1)
    num_splits = min(num_splits, n_blocks)
    bps = pl.cdiv(n_blocks, num_splits)
    rows = g * t
    block_q = min(-(-rows // 8) * 8, BLOCK_Q)
    r = -(-rows // block_q) * block_q
    # rows ordered (group member, token); padded to a multiple of the row block
    quantized = k_scale is not None
    qr, qpos = group_rows(q, q_positions, hkv, r, q.dtype if quantized else k_cache.dtype)
    qpos = qpos[:, :, None]
    kf = k_cache.reshape(b, s, hkv * d)
    vf = v_cache.reshape(b, s, hkv * d)
    cpos = cache_positions.astype(jnp.int32).reshape(b, 1, s)
    lens = cache_lengths.astype(jnp.int32)
    win = jnp.asarray(window, jnp.int32).reshape(1)

    def kv_block(bi, split, i, lens_ref):
        last = jnp.maximum(pl.cdiv(lens_ref[bi], block_kv) - 1, 0)
        return jnp.minimum(jnp.minimum(split * bps + i, n_blocks - 1), last)

    kv_spec = pl.BlockSpec((None, block_kv, d),
                           lambda bi, h, qb, sp, i, lr, wr: (bi, kv_block(bi, sp, i, lr), h))
    # scales as [B, Hkv, 1, S]: one lane-dense [1, block_kv] row per tile
    scale_spec = pl.BlockSpec((None, None, 1, block_kv),
                              lambda bi, h, qb, sp, i, lr, wr: (bi, h, 0,
                                                                kv_block(bi, sp, i, lr)))
    scales = ([jnp.transpose(x.astype(jnp.float32), (0, 2, 1))[:, :, None]
               for x in (k_scale, v_scale)] if quantized else [])
    out_map = lambda bi, h, qb, sp, i, lr, wr: (bi, h, sp, qb, 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, hkv, r // block_q, num_splits, bps),
        in_specs=[
            pl.BlockSpec((None, None, block_q, d),
                         lambda bi, h, qb, sp, i, lr, wr: (bi, h, qb, 0)),
            pl.BlockSpec((None, block_q, 1), lambda bi, h, qb, sp, i, lr, wr: (bi, qb, 0)),
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, 1, block_kv),
                         lambda bi, h, qb, sp, i, lr, wr: (bi, 0, kv_block(bi, sp, i, lr))),
        ] + [scale_spec] * len(scales),
        out_specs=[pl.BlockSpec((None, None, None, block_q, d), out_map),
                   pl.BlockSpec((None, None, None, block_q, 1), out_map)],
        scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32),
                        pltpu.VMEM((block_q, 1), jnp.float32),
                        pltpu.VMEM((block_q, d), jnp.float32)],
    )
    kernel = functools.partial(_cache_kernel, scale=float(scale),
                               soft_cap=float(logit_soft_cap or 0.0), block_kv=block_kv,
                               blocks_per_split=bps, quantized=quantized)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, hkv, num_splits, r, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, num_splits, r, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="cadenza_cache_attention",
    )(lens, win, qr, qpos, kf, vf, cpos, *scales)
    outs, lses = ungroup_rows(o, lse[..., 0], t, g)
    return list(outs), list(lses)


def decode_attention_tpu(q, k, v, *, scale, q_positions, k_cache, v_cache, cache_lengths,
                         cache_positions, tail_mask=None, segment_ids=None, window=0,
                         logit_soft_cap=0.0, block_kv=None, num_splits=None, interpret=False,
                         splash_tail=False, k_scale=None, v_scale=None):
    """Verify/decode/prefill attention over a cache: Pallas over the cache, the new tokens
    among themselves in XLA (or splash), merged by log-sum-exp.

    Same arguments and result as
    :func:`cadenza.pallas_kernels.attention_reference.reference_attention` with a
    cache (plus the kernel's ``block_kv``, ``num_splits``, ``interpret``), including an
    int8 cache given as codes with ``k_scale``/``v_scale``.
    ``splash_tail``: attend among the new tokens with splash (long prefill
    chunks; needs ``tail_mask=None``, a Python-int window, ``T % 128 == 0``).
    Forward only (decoding); not differentiable.
    """
    outs, lses = cache_attention_tpu(
        q, k_cache, v_cache, cache_lengths=cache_lengths, cache_positions=cache_positions,
        q_positions=q_positions, scale=scale, window=window, logit_soft_cap=logit_soft_cap,
        block_kv=block_kv, num_splits=num_splits, interpret=interpret, k_scale=k_scale,
        v_scale=v_scale)
    if splash_tail:
        tail_out, tail_lse = flash_attention_tpu(
            q, k, v, scale=scale, segment_ids=segment_ids, window=window,
            logit_soft_cap=logit_soft_cap, interpret=bool(interpret), return_lse=True)
    else:
        tail_out, tail_lse = tail_attention_with_lse(
            q, k, v, scale=scale, q_positions=q_positions, tail_mask=tail_mask,
            segment_ids=segment_ids, window=window, logit_soft_cap=logit_soft_cap)
    return merge_parts(outs + [tail_out], lses + [tail_lse]).astype(q.dtype)
