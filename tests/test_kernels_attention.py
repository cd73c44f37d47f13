"""Attention kernels vs the XLA reference (TPU interpret mode on CPU) and the dispatcher."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from cadenza.errors import ConfigError
from cadenza.models import KVCache, Transformer, init_params
from cadenza.models.cache import quantize_kv
from cadenza.models.config import ATTENTION_IMPLS
from cadenza.pallas_kernels import attention as dispatch
from cadenza.pallas_kernels import decode_attention_tpu as decode_attention_tpu_module
from cadenza.pallas_kernels.attention_reference import reference_attention
from cadenza.pallas_kernels.attention_xla import xla_attention
from cadenza.pallas_kernels.decode_attention_tpu import decode_attention_tpu
from cadenza.pallas_kernels.flash_attention_tpu import flash_attention_tpu
from cadenza.train.config import MeshConfig
from cadenza.train.mesh import make_mesh


def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _tree_mask(key, b, t):
    """Random token trees: each node's parent is an earlier node; mask = ancestry."""
    parents = np.asarray(jax.random.randint(key, (b, t), 0, t))
    mask = np.zeros((b, t, t), bool)
    depth = np.zeros((b, t), np.int32)
    for r in range(b):
        for i in range(t):
            mask[r, i, i] = True
            if i:
                p = parents[r, i] % i
                mask[r, i] |= mask[r, p]
                depth[r, i] = depth[r, p] + 1
    return jnp.asarray(mask), jnp.asarray(depth)


def _decode_case(b, t, hq, hkv, d, s, lengths, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    lengths = jnp.asarray(lengths, jnp.int32)
    slots = jnp.arange(s)[None, :, None, None]
    # slots >= length hold huge garbage: any leak into the result shows.
    garbage = jnp.where(slots < lengths[:, None, None, None], 1.0, 1e4)
    tail_mask, depth = _tree_mask(ks[5], b, t)
    return dict(
        q=_normal(ks[0], (b, t, hq, d), dtype), k=_normal(ks[1], (b, t, hkv, d), dtype),
        v=_normal(ks[2], (b, t, hkv, d), dtype),
        k_cache=(_normal(ks[3], (b, s, hkv, d)) * garbage).astype(dtype),
        v_cache=(_normal(ks[4], (b, s, hkv, d)) * garbage).astype(dtype),
        cache_lengths=lengths, cache_positions=jnp.broadcast_to(jnp.arange(s), (b, s)),
        q_positions=lengths[:, None] + depth, tail_mask=tail_mask)


@pytest.mark.parametrize("hq,hkv,t,window,cap,dtype,splits,int8", [
    (4, 2, 5, 50, 3.0, jnp.float32, 2, False),   # GQA 2, tree mask, window, soft-cap, 2 splits
    (4, 1, 1, 0, 0.0, jnp.bfloat16, 1, False),   # MQA, plain decode, bf16, one split
    (4, 2, 3, 60, 3.0, jnp.float32, 2, True),    # int8 cache: codes + per-slot, per-head
    (4, 2, 3, 60, 3.0, jnp.bfloat16, 2, True),   # scales, vs the dequantised reference
])
def test_decode_kernel_matches_reference(hq, hkv, t, window, cap, dtype, splits, int8):
    # ragged: empty cache, inside the first block, across the split, nearly full
    case = _decode_case(4, t, hq, hkv, 128, 256, [0, 5, 130, 250], dtype)
    if int8:
        for name in ("k_cache", "v_cache"):
            case[name], case[name[0] + "_scale"] = quantize_kv(case[name])
    kw = dict(scale=0.2, window=window, logit_soft_cap=cap)
    run = jax.jit(lambda c: decode_attention_tpu(**c, **kw, block_kv=128, num_splits=splits,
                                                 interpret=pltpu.InterpretParams()))
    out = run(case)
    ref = reference_attention(**case, **kw)
    assert out.dtype == dtype and out.shape == case["q"].shape
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=tol, rtol=tol)


def test_prefill_into_cache_with_splash_tail_matches_reference(monkeypatch):
    """A long causal chunk over a ragged cache: the cache kernel in row blocks (2 here)
    merged with splash's log-sum-exp over the chunk itself."""
    monkeypatch.setattr(decode_attention_tpu_module, "BLOCK_Q", 128)
    case = _decode_case(2, 128, 4, 2, 128, 256, [0, 140], jnp.float32, seed=3)
    case.update(tail_mask=None, q_positions=case["cache_lengths"][:, None] + jnp.arange(128))
    kw = dict(scale=0.2, window=50, logit_soft_cap=3.0)
    run = jax.jit(lambda c: decode_attention_tpu(**c, **kw, block_kv=128, splash_tail=True,
                                                 interpret=pltpu.InterpretParams()))
    np.testing.assert_allclose(run(case), reference_attention(**case, **kw), atol=2e-5,
                               rtol=2e-5)


def test_splash_forward_and_grads_match_reference():
    b, t, hq, hkv, d = 2, 256, 4, 2, 128
    ks = jax.random.split(jax.random.key(1), 4)
    q, k, v = (_normal(ks[0], (b, t, hq, d)), _normal(ks[1], (b, t, hkv, d)),
               _normal(ks[2], (b, t, hkv, d)))
    cut = jnp.array([[100], [37]])
    idx = jnp.arange(t)[None]
    # two packed segments, then padding (segment 0) at the end of row 1
    seg = jnp.where(idx < cut, 1, 2) * jnp.where((idx >= 200) & (jnp.arange(b)[:, None] == 1),
                                                 0, 1)
    starts = jnp.where(idx < cut, 0, cut)
    starts = jnp.where(seg == 0, 200, starts)
    pos = idx - starts
    kw = dict(scale=0.15, segment_ids=seg, window=37, logit_soft_cap=4.0)
    cot = _normal(ks[3], q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

    # Generic interpret mode: TPU interpret mode cannot run splash under vmap in jax 0.12
    # (its grid-semantics check does not see vmap's extra grid dims).
    kernel = loss(lambda q, k, v: flash_attention_tpu(q, k, v, block=128, interpret=True, **kw))
    val, grads = jax.jit(jax.value_and_grad(kernel, argnums=(0, 1, 2)))(q, k, v)
    ref_fn = loss(lambda q, k, v: reference_attention(q, k, v, q_positions=pos, **kw))
    ref_val, ref_grads = jax.value_and_grad(ref_fn, argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(val, ref_val, rtol=1e-4)
    for g, rg in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(rg), atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_xla_attention_values_and_grads_match_reference(dtype, tol):
    """The hand-written VJP path: GQA, packed segments with padding, a window, and a tree
    mask whose first query sees nothing (zeros and zero gradients there, no NaN)."""
    b, t, hq, hkv, d = 2, 12, 4, 2, 8
    ks = jax.random.split(jax.random.key(5), 5)
    q, k, v, cot = (_normal(ks[0], (b, t, hq, d), dtype), _normal(ks[1], (b, t, hkv, d), dtype),
                    _normal(ks[2], (b, t, hkv, d), dtype), _normal(ks[3], (b, t, hq, d)))
    seg = jnp.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12])
    pos = jnp.array([list(range(5)) * 2 + [0, 1], list(range(12))])
    tail, _ = _tree_mask(ks[4], b, t)
    cases = [dict(segment_ids=seg, window=3), dict(tail_mask=tail.at[:, 0, 0].set(False))]
    for kw in cases:
        kw.update(scale=0.3, q_positions=pos)

        def loss(fn, kw=kw):
            return lambda q, k, v: jnp.sum(fn(q, k, v, **kw).astype(jnp.float32) * cot)

        val, grads = jax.jit(jax.value_and_grad(loss(xla_attention), argnums=(0, 1, 2)))(q, k, v)
        ref, ref_grads = jax.value_and_grad(loss(reference_attention), argnums=(0, 1, 2))(q, k, v)
        np.testing.assert_allclose(val, ref, rtol=tol)
        assert xla_attention(q, k, v, **kw).dtype == dtype
        for g, rg in zip(grads, ref_grads):
            assert g.dtype == dtype and np.isfinite(np.asarray(g, np.float32)).all()
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(rg, np.float32),
                                       atol=tol, rtol=tol)
    out = xla_attention(q, k, v, **cases[1])
    assert not np.asarray(out[:, 0], np.float32).any()


def test_model_with_pallas_equals_xla_sharded(tiny_config, caplog):
    """gemma2 (soft-cap, alternating windows under scan, GQA) on a (2,2,2) mesh:
    training loss + grads with packing, then a tree-verify step over a ragged cache.
    Both go through the kernels (no fallback is logged)."""
    dispatch._logged.clear()
    caplog.set_level(logging.WARNING, logger=dispatch.__name__)
    base = ["model.head_dim=128", "model.num_layers=2"]
    cfgs = {impl: tiny_config("gemma2", *base, f"model.attention_impl={impl}")
            for impl in ("xla", "pallas")}
    params = init_params(cfgs["xla"], jax.random.key(0))
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2)
    mesh = make_mesh(mesh_cfg)
    b, t = 4, 128
    tokens = jax.random.randint(jax.random.key(1), (b, t), 3, cfgs["xla"].vocab_size)
    seg = jnp.where(jnp.arange(t)[None] < jnp.array([[128], [60], [90], [10]]), 1, 2)
    pos = jnp.where(seg == 1, jnp.arange(t), jnp.arange(t) - jnp.array([[128], [60], [90], [10]]))

    def train_loss(impl):
        model = Transformer(cfgs[impl])

        def loss(p):
            with nn.logical_axis_rules(mesh_cfg.rules()):
                logits = model.apply({"params": p}, tokens, positions=pos, segment_ids=seg)[0]
            return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

        with jax.set_mesh(mesh):
            return jax.jit(jax.value_and_grad(loss))(params)

    (lx, gx), (lp, gp) = train_loss("xla"), train_loss("pallas")
    np.testing.assert_allclose(lp, lx, rtol=1e-5)
    for a, c in zip(jax.tree.leaves(gp), jax.tree.leaves(gx)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5, rtol=1e-3)

    cache = KVCache.create(cfgs["xla"], b, 256).with_lengths(jnp.array([3, 17, 0, 120]))
    kk, kv = jax.random.split(jax.random.key(4))
    cache = cache.replace(k=_normal(kk, cache.k.shape), v=_normal(kv, cache.v.shape),
                          positions=jnp.broadcast_to(jnp.arange(256), (b, 256)))
    tree, depth = _tree_mask(jax.random.key(2), b, 4)

    def verify(impl):
        model = Transformer(cfgs[impl])

        def step(p, c):
            with nn.logical_axis_rules(mesh_cfg.rules()):
                return model.apply({"params": p}, tokens[:, :4],
                                   positions=c.lengths[:, None] + depth,
                                   attention_mask=tree, cache=c)[0]

        with jax.set_mesh(mesh):
            return jax.jit(step)(params, cache)

    np.testing.assert_allclose(verify("pallas"), verify("xla"), atol=1e-5, rtol=1e-4)
    # the same cache stored as int8: the kernel reads codes + scales on the mesh
    codes = {n: quantize_kv(getattr(cache, n)) for n in ("k", "v")}
    cache = KVCache.create(cfgs["xla"], b, 256, "int8").replace(
        k=codes["k"][0], k_scale=codes["k"][1], v=codes["v"][0], v_scale=codes["v"][1],
        positions=cache.positions, lengths=cache.lengths)
    np.testing.assert_allclose(verify("pallas"), verify("xla"), atol=1e-5, rtol=1e-4)
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_unsupported_cases_fall_back_to_xla_once(caplog):
    ks = jax.random.split(jax.random.key(3), 3)
    q, k, v = (_normal(ks[0], (2, 5, 4, 32)), _normal(ks[1], (2, 5, 2, 32)),
               _normal(ks[2], (2, 5, 2, 32)))
    kw = dict(scale=0.3, q_positions=jnp.broadcast_to(jnp.arange(5), (2, 5)))
    dispatch._logged.clear()
    with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
        for impl in ("pallas", "pallas", "cudnn", "auto"):
            out = dispatch.attention(q, k, v, implementation=impl, **kw)
            np.testing.assert_array_equal(out, xla_attention(q, k, v, **kw))
        # sequence parallelism: the kernels need whole rows per shard
        q2, k2, v2 = (jnp.tile(x, (1, 128 // 5 + 1, 1, 1))[:, :128] for x in (q, k, v))
        kw2 = dict(scale=0.3, q_positions=jnp.broadcast_to(jnp.arange(128), (2, 128)))
        mesh_cfg = MeshConfig(data=2, sequence=4)
        with jax.set_mesh(make_mesh(mesh_cfg)), nn.logical_axis_rules(mesh_cfg.rules()):
            out = jax.jit(lambda q, k, v: dispatch.attention(q, k, v, implementation="pallas",
                                                             **kw2))(q2, k2, v2)
        np.testing.assert_allclose(out, xla_attention(q2, k2, v2, **kw2), atol=1e-6)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages   # one per distinct reason; auto on CPU is plain XLA
    assert "not a multiple of 128" in messages[0] and "cuDNN needs a GPU" in messages[1]
    assert "sharded along its length" in messages[2]
    with pytest.raises(ConfigError, match="unknown attention implementation"):
        dispatch.attention(q, k, v, implementation="triton", **kw)


def test_config_choices_are_the_dispatch_choices():
    assert tuple(ATTENTION_IMPLS) == dispatch.IMPLEMENTATIONS
