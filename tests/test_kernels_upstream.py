"""The upstream GPU kernel adapters (cadenza.pallas_kernels.upstream_gpu) compute what
bench/kernels_attention.py compares them against: jax's Triton decode and paged kernels,
run in Pallas interpret mode on CPU, over a ragged cache with GQA and several new tokens
folded into the query heads, vs the float32 cache-only reference."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.pallas_kernels import upstream_gpu


def test_jax_triton_verify_adapters_match_the_reference():
    b, s, hq, hkv, d, t = 2, 256, 4, 2, 32, 3      # S / 16 splits >= 16; 16 pages of 16
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, t, hq, d), jnp.float32)
    kc = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32)
    vc = jax.random.normal(ks[2], (b, s, hkv, d), jnp.float32)
    lengths = jnp.array([200, 17], jnp.int32)
    fns, _ = upstream_gpu.verify_kernels(0.3, page_size=16, interpret=True)
    ref = upstream_gpu.cache_only_reference(q, kc, vc, lengths, 0.3)
    names = [n for n in fns if n.startswith("jax ")]
    assert len(names) == 2, list(fns)
    for name in names:
        prepare, run = fns[name]
        np.testing.assert_allclose(run(q, prepare(kc, vc), lengths), ref, atol=1e-5,
                                   err_msg=name)


@pytest.mark.skipif(importlib.util.find_spec("tokamax") is None,
                    reason="tokamax is carried to the GPU machine only (make test-jax011 has it)")
def test_tokamax_imports_without_xprof():
    tokamax, why = upstream_gpu.import_tokamax()
    assert tokamax is not None, why
    fns, missing = upstream_gpu.flash_kernels(0.1)
    assert {"tokamax mosaic", "tokamax triton"} <= set(fns), missing
