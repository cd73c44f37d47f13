"""Mosaic GPU attention kernels vs the XLA reference, in Mosaic GPU interpret mode on CPU.

Interpret mode (``plgpu.InterpretGPUParams``) runs the kernel bodies on the
CPU while simulating GMEM/SMEM, TMA copies, barriers and ``wgmma``: it proves
the kernels' semantics, not their speed nor that they fit an H100's registers
and SMEM. ``test_kernels_lower_for_cuda`` additionally lowers them for the CUDA
platform on this CPU, which checks every operation has a Mosaic GPU lowering.

``CADENZA_GPU_KERNEL_TESTS=hardware`` runs the same tests on a GPU instead
(no interpret mode, the real backend; scripts/gpu_check.py sets it); with that
switch and no GPU backend, every test fails rather than silently interpreting.
"""

import contextlib
import importlib.util
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from cadenza.models.cache import quantize_kv
from cadenza.pallas_kernels import attention as dispatch
from cadenza.pallas_kernels.attention_reference import reference_attention
from cadenza.pallas_kernels.decode_attention_gpu import decode_attention_gpu
from cadenza.pallas_kernels.flash_attention_mosaic_gpu import flash_attention_mosaic_gpu

# the ragged-cache and tree-mask cases are the TPU kernel tests' own
_spec = importlib.util.spec_from_file_location(
    "_tpu_kernel_tests", pathlib.Path(__file__).with_name("test_kernels_attention.py"))
_tpu_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tpu_tests)
_decode_case, _normal = _tpu_tests._decode_case, _tpu_tests._normal

ON_HARDWARE = os.environ.get("CADENZA_GPU_KERNEL_TESTS") == "hardware"
INTERPRET = None if ON_HARDWARE else plgpu.InterpretGPUParams()


@pytest.fixture(autouse=True)
def _backend_matches_mode():
    """On hardware the kernels must meet a real GPU, never a CPU fallback."""
    if ON_HARDWARE:
        assert jax.default_backend() == "gpu", (
            f"CADENZA_GPU_KERNEL_TESTS=hardware but JAX's backend is {jax.default_backend()}")


def _close(out, ref, tol):
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("b,hq,hkv,t,d,s,lengths,window,cap,dtype,splits", [
    # GQA 2, tree mask, window, soft-cap, 2 splits; lengths: empty, across blocks, nearly full
    (3, 4, 2, 5, 64, 256, [0, 70, 250], 50, 3.0, jnp.bfloat16, 2),
    # MQA, fp16, head_dim 128, 2 x 40 = 80 query rows (two row blocks, the second padded),
    # default splits (one per block), a length on a block edge
    (2, 2, 1, 40, 128, 128, [64, 127], 0, 0.0, jnp.float16, None),
])
def test_decode_kernel_matches_reference(b, hq, hkv, t, d, s, lengths, window, cap, dtype,
                                         splits):
    case = _decode_case(b, t, hq, hkv, d, s, lengths, dtype)
    kw = dict(scale=0.2, window=window, logit_soft_cap=cap)
    run = jax.jit(lambda c: decode_attention_gpu(**c, **kw, block_kv=64, num_splits=splits,
                                                 interpret=INTERPRET))
    out = run(case)
    assert out.dtype == dtype and out.shape == case["q"].shape
    _close(out, reference_attention(**case, **kw), 2e-2)


def _int8_case(b, t, hq, hkv, d, s, lengths, dtype):
    """The decode case with its cache as int8 codes + per-slot, per-head scales."""
    case = _decode_case(b, t, hq, hkv, d, s, lengths, dtype)
    for name in ("k_cache", "v_cache"):
        case[name], case[name[0] + "_scale"] = quantize_kv(case[name])
    return case


def test_decode_kernel_reads_an_int8_cache():
    """int8 tiles converted in SMEM, scales on scores and probabilities: equals the
    reference over the dequantised cache (GQA, tree mask, window, soft-cap, 2 splits)."""
    case = _int8_case(3, 5, 4, 2, 64, 256, [0, 70, 250], jnp.bfloat16)
    kw = dict(scale=0.2, window=50, logit_soft_cap=3.0)
    run = jax.jit(lambda c: decode_attention_gpu(**c, **kw, block_kv=64, num_splits=2,
                                                 interpret=INTERPRET))
    out = run(case)
    assert out.dtype == jnp.bfloat16 and out.shape == case["q"].shape
    _close(out, reference_attention(**case, **kw), 2e-2)


def _packed_batch(key, b, t, hq, hkv, d, dtype):
    """q, k, v and a packed layout: two segments per row, padding (segment 0) at the end
    of row 1; positions restart per segment."""
    ks = jax.random.split(key, 3)
    q, k, v = (_normal(ks[0], (b, t, hq, d), dtype), _normal(ks[1], (b, t, hkv, d), dtype),
               _normal(ks[2], (b, t, hkv, d), dtype))
    idx = jnp.arange(t)[None]
    cut = jnp.array([[t - 28], [37]])[:b]
    pad = (idx >= t - 18) & (jnp.arange(b)[:, None] == 1)
    seg = jnp.where(idx < cut, 1, 2) * jnp.where(pad, 0, 1)
    starts = jnp.where(pad, t - 18, jnp.where(idx < cut, 0, cut))
    return q, k, v, seg, idx - starts


def test_flash_forward_and_grads_match_reference():
    """Soft-cap + sliding window + segment ids + GQA, causal, bf16: forward and dq/dk/dv."""
    q, k, v, seg, pos = _packed_batch(jax.random.key(1), 2, 128, 2, 1, 64, jnp.bfloat16)
    kw = dict(scale=0.15, segment_ids=seg, window=37, logit_soft_cap=4.0, q_positions=pos)
    cot = _normal(jax.random.key(2), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)

    kernel = loss(lambda q, k, v: flash_attention_mosaic_gpu(q, k, v, interpret=INTERPRET,
                                                             **kw))
    # the loss is the forward output against a random cotangent: checks the forward too
    val, grads = jax.jit(jax.value_and_grad(kernel, argnums=(0, 1, 2)))(q, k, v)
    exact = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_val, ref_grads = jax.value_and_grad(
        loss(lambda q, k, v: reference_attention(q, k, v, **kw)), argnums=(0, 1, 2))(*exact)
    np.testing.assert_allclose(val, ref_val, rtol=2e-3)
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == jnp.bfloat16
        _close(g, rg, 3e-2)


def test_kernels_lower_for_cuda():
    """Every operation of the decode kernel and of the flash forward + backward has a
    Mosaic GPU lowering (layout inference included): lowered for CUDA on this CPU."""
    case = _decode_case(2, 4, 4, 2, 128, 256, [3, 200], jnp.bfloat16)
    decode = jax.jit(lambda c: decode_attention_gpu(**c, scale=0.1, window=64,
                                                    logit_soft_cap=5.0))
    assert "mosaic_gpu" in decode.trace(case).lower(lowering_platforms=("cuda",)).as_text()
    int8 = _int8_case(2, 4, 4, 2, 128, 256, [3, 200], jnp.bfloat16)
    assert "mosaic_gpu" in decode.trace(int8).lower(lowering_platforms=("cuda",)).as_text()
    q, k, v, seg, pos = _packed_batch(jax.random.key(1), 2, 128, 4, 2, 128, jnp.bfloat16)

    def loss(q, k, v):
        return jnp.sum(flash_attention_mosaic_gpu(q, k, v, scale=0.1, q_positions=pos,
                                                  segment_ids=seg, window=32,
                                                  logit_soft_cap=3.0).astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 3   # forward, dq, dk/dv kernels


def test_gpu_dispatch_uses_the_mosaic_kernels(monkeypatch, caplog):
    """On a GPU backend (on CPU simulated: the platform is patched, kernels forced into
    GPU interpret mode), ``auto`` sends what cuDNN cannot take (soft-cap + packing) to the
    Mosaic flash kernel and cache attention to the decode kernel; a float32 case falls
    back to XLA with one log line."""
    if not ON_HARDWARE:
        monkeypatch.setattr(dispatch, "compile_platform", lambda: "gpu")
    dispatch._logged.clear()
    caplog.set_level(logging.WARNING, logger=dispatch.__name__)
    q, k, v, seg, pos = _packed_batch(jax.random.key(3), 2, 64, 2, 1, 64, jnp.bfloat16)
    flash_kw = dict(scale=0.2, q_positions=pos, segment_ids=seg, window=20, logit_soft_cap=3.0)
    case = _decode_case(2, 3, 2, 1, 64, 128, [0, 100], jnp.bfloat16, seed=5)
    decode_kw = dict(scale=0.2, window=0, logit_soft_cap=0.0)
    # No mesh here: GPU interpret mode in jax 0.12 simulates one device, and under a
    # multi-device shard_map its shared state collides (the shard_map wrapping is the
    # TPU path's, tested in test_kernels_attention.py).
    with contextlib.nullcontext() if ON_HARDWARE else plgpu.force_gpu_interpret_mode(INTERPRET):
        flash = jax.jit(lambda q, k, v: dispatch.attention(q, k, v, implementation="auto",
                                                           **flash_kw))(q, k, v)
        decode = jax.jit(lambda c: dispatch.attention(implementation="pallas", **c,
                                                      **decode_kw))(case)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    _close(flash, reference_attention(q, k, v, **flash_kw), 2e-2)
    _close(decode, reference_attention(**case, **decode_kw), 2e-2)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    out = dispatch.attention(q32, k32, v32, implementation="pallas", **flash_kw)
    np.testing.assert_array_equal(out, reference_attention(q32, k32, v32, **flash_kw))
    [record] = caplog.records
    assert "Mosaic GPU: dtype float32" in record.getMessage()
