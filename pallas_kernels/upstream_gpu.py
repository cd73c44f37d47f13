"""Upstream GPU attention kernels, wrapped to cadenza's layouts (bench/kernels_attention.py).

- flash (causal prefill / training, ``q, k, v: [B, T, H, D]``): jax's Pallas Mosaic GPU
  kernel ``jax.experimental.pallas.ops.gpu.attention_mgpu`` (fwd + its own bwd) and the
  tokamax library's ``dot_product_attention`` (``mosaic`` and ``triton`` implementations);
- verify (``T`` new tokens over a KV cache ``[B, S, Hkv, D]`` of ``lengths`` valid
  entries): jax's Pallas Triton decode kernels ``decode_attention.gqa`` (ragged
  lengths) and ``paged_attention.paged_attention`` (the cache laid out in pages before
  timing), the ``T`` tokens folded into the query-head axis, and tokamax's
  ``dot_product_attention`` with ``key_value_seq_lengths``.

The upstream verify kernels attend the new tokens to the cache only: cadenza's verify
attention also attends them to each other (a causal or tree mask, merged by
log-sum-exp), so their rows do slightly less work; the bench checks each against the
matching reference (:func:`cache_only_reference`). Each getter returns the kernels it
could import and, for the others, why not (one line each), so a missing library is a
row in the results, not a failed run. Nothing here is dispatched by
:mod:`cadenza.pallas_kernels.attention` yet: which kernel serves which case is to be
decided from these measurements (docs/kernels.md).
"""

import sys
import types

import jax
import jax.numpy as jnp


def import_tokamax():
    """tokamax, or the reason it cannot be imported. tokamax 0.0.17 imports
    ``xprof.cli.tools`` at import time for its own profiler-based benchmarking, which
    these rows do not use; xprof (22 MB, compiled, with server dependencies) is not on
    the GPU image nor carried, so when it is missing a stand-in module is registered."""
    try:
        import xprof.cli.tools  # noqa: F401
    except ImportError:
        stub = types.ModuleType("xprof.cli.tools")
        stub.get_kernel_stats_tool = None
        for name in ("xprof", "xprof.cli"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["xprof.cli.tools"] = stub
    try:
        import tokamax
    except Exception as e:    # ImportError, or a version mismatch inside tokamax
        return None, f"tokamax: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return tokamax, None


def flash_kernels(scale: float):
    """``({name: fn(q, k, v) -> out}, [why-not lines])``: causal attention, ``q``
    ``[B, T, Hq, D]``, ``k, v`` ``[B, T, Hkv, D]``, bf16/fp16, differentiable."""
    fns, missing = {}, []
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

        cfg = mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
        # attention_mgpu applies no softmax scale: the queries are scaled instead
        fns["jax attention_mgpu"] = lambda q, k, v: mgpu.attention(
            (q * scale).astype(q.dtype), k, v, cfg)
    except ImportError as e:
        missing.append(f"jax attention_mgpu: {e}")
    _add_tokamax(fns, missing, lambda tokamax, impl: lambda q, k, v: (
        tokamax.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                      implementation=impl)))
    return fns, missing


def _add_tokamax(fns: dict, missing: list, make):
    """``fns["tokamax <impl>"] = make(tokamax, impl)`` for its mosaic and triton
    implementations, or why tokamax is missing onto ``missing``."""
    tokamax, why = import_tokamax()
    if tokamax is None:
        missing.append(why)
        return
    for impl in ("mosaic", "triton"):
        fns[f"tokamax {impl}"] = make(tokamax, impl)


def _fold(q, hkv: int):
    """``[B, T, Hq, D]`` -> ``[B, Hkv * T * G, D]`` (G = Hq / Hkv): the T new tokens become
    query heads of their KV head's group, for decode kernels that take one query per
    head and group consecutive query heads per KV head."""
    b, t, _, d = q.shape
    return q.reshape(b, t, hkv, -1, d).transpose(0, 2, 1, 3, 4).reshape(b, -1, d)


def _unfold(o, b, t, hq, hkv):
    d = o.shape[-1]
    return o.reshape(b, hkv, t, hq // hkv, d).transpose(0, 2, 1, 3, 4).reshape(b, t, hq, d)


def verify_kernels(scale: float, page_size: int = 16, interpret: bool = False):
    """``({name: (prepare, run)}, [why-not lines])``. ``prepare(k_cache, v_cache)``
    lays the cache out for the kernel (outside the timed call); ``run(q, prepared,
    lengths)`` -> ``[B, T, Hq, D]``: each new token attends to ``cache[:lengths]``.
    ``interpret`` runs the Triton kernels in Pallas interpret mode (CPU tests)."""
    fns, missing = {}, []
    try:
        from jax.experimental.pallas.ops.gpu import decode_attention as da

        def gqa(q, kv, lengths):
            b, t, hq, _ = q.shape
            hkv = kv[0].shape[2]
            o = da.gqa(_fold(q, hkv), kv[0], kv[1], kv_seq_len=lengths, sm_scale=scale,
                       interpret=interpret)
            return _unfold(o, b, t, hq, hkv)

        fns["jax decode_attention.gqa (triton)"] = (lambda kc, vc: (kc, vc), gqa)
    except ImportError as e:
        missing.append(f"jax decode_attention: {e}")
    try:
        from jax.experimental.pallas.ops.gpu import paged_attention as pa

        def pages(kc, vc):
            b, s, hkv, d = kc.shape
            to_pages = lambda x: x.transpose(2, 0, 1, 3).reshape(  # noqa: E731
                hkv, b * s // page_size, page_size, d)
            tables = jnp.arange(b * s // page_size, dtype=jnp.int32).reshape(b, -1)
            return to_pages(kc), to_pages(vc), tables

        def paged(q, kv, lengths):
            b, t, hq, _ = q.shape
            hkv = kv[0].shape[0]
            # paged_attention applies no softmax scale: the queries are scaled instead
            o = pa.paged_attention(_fold((q * scale).astype(q.dtype), hkv), kv[0], kv[1],
                                   kv[2], lengths, interpret=interpret)
            return _unfold(o, b, t, hq, hkv)

        fns[f"jax paged_attention (triton, page {page_size})"] = (pages, paged)
    except ImportError as e:
        missing.append(f"jax paged_attention: {e}")
    _add_tokamax(fns, missing, lambda tokamax, impl: (
        lambda kc, vc: (kc, vc),
        lambda q, kv, lengths: tokamax.dot_product_attention(
            q, kv[0], kv[1], scale=scale, implementation=impl, key_value_seq_lengths=lengths)))
    return fns, missing


def cache_only_reference(q, k_cache, v_cache, lengths, scale: float):
    """float32 attention of every new token to ``cache[:lengths]`` (no mask among the new
    tokens): what the upstream verify kernels compute. Shapes as :func:`verify_kernels`."""
    b, t, hq, d = q.shape
    hkv = k_cache.shape[2]
    qg = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)
    s = jnp.einsum("bthgd,bshd->bhgts", qg, k_cache.astype(jnp.float32)) * scale
    valid = jnp.arange(k_cache.shape[1])[None, :] < lengths[:, None]         # [B, S]
    s = jnp.where(valid[:, None, None, None, :], s, -jnp.inf)
    o = jnp.einsum("bhgts,bshd->bthgd", jax.nn.softmax(s, axis=-1), v_cache.astype(jnp.float32))
    return o.reshape(b, t, hq, d)
