"""Mosaic GPU attention kernels vs the XLA reference, in Mosaic GPU interpret mode on CPU.

Interpret mode (``plgpu.InterpretGPUParams``) runs the kernel bodies on the
CPU while simulating GMEM/SMEM, TMA copies, barriers and ``wgmma``: it proves
the kernels' semantics, not their speed nor that they fit an H100's registers
and SMEM. ``test_kernels_lower_for_cuda`` additionally lowers them for the CUDA
platform on this CPU, which checks every operation has a Mosaic GPU lowering.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from cadenza.pallas_kernels.attention_reference import reference_attention
from cadenza.pallas_kernels.decode_attention_gpu import decode_attention_gpu

# the ragged-cache and tree-mask cases are the TPU kernel tests' own
_spec = importlib.util.spec_from_file_location(
    "_tpu_kernel_tests", pathlib.Path(__file__).with_name("test_kernels_attention.py"))
_tpu_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tpu_tests)
_decode_case, _normal = _tpu_tests._decode_case, _tpu_tests._normal

INTERPRET = plgpu.InterpretGPUParams()


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
