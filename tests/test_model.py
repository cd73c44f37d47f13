"""The Flax transformer: cache equivalence, sharding, scan, and each family's features."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.models import (
    KVCache,
    Transformer,
    decode_layout,
    init_params,
    stack_layers,
    unstack_layers,
)
from cadenza.models.families import NAMES
from cadenza.models.layers import rope_inv_freq
from cadenza.train.config import MeshConfig
from cadenza.train.mesh import make_mesh

FAMILIES = [*NAMES, "llama3_rope"]  # every family's tiny variant (tests/conftest.py)


class _Jitted:
    """A model whose ``apply`` is jitted (tests call it many times with the same shapes)."""

    def __init__(self, cfg):
        self.module = Transformer(cfg)
        self.apply = jax.jit(self.module.apply)


def _setup(tiny_config, family, *overrides, seed=0):
    cfg = tiny_config(family, *overrides)
    params = init_params(cfg, jax.random.key(seed))
    return cfg, _Jitted(cfg), params


def _tokens(cfg, b, t, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 3, cfg.vocab_size)


def _close(a, b, atol=1e-4):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_decode_equals_full_forward(tiny_config, family):
    cfg, model, params = _setup(tiny_config, family)
    tokens = _tokens(cfg, 2, 12)
    full, _, _ = model.apply({"params": params}, tokens)
    cache = KVCache.create(cfg, 2, 16)
    logits, _, cache = model.apply({"params": params}, tokens[:, :7], cache=cache)
    cache = cache.advance(7)
    pieces = [logits]
    for i in range(7, 12):
        step, _, cache = model.apply({"params": params}, tokens[:, i:i + 1], cache=cache)
        cache = cache.advance(1)
        pieces.append(step)
    _close(jnp.concatenate(pieces, axis=1), full)


def test_ragged_prefill_matches_each_prompt_alone(tiny_config):
    cfg, model, params = _setup(tiny_config, "mistral")
    lens = [9, 5]
    tokens = _tokens(cfg, 2, 9)
    cache = KVCache.create(cfg, 2, 16)
    logits, _, cache = model.apply({"params": params}, tokens, cache=cache)
    cache = cache.with_lengths(jnp.array(lens))
    nxt = jnp.array([[11], [12]])
    step, _, _ = model.apply({"params": params}, nxt, cache=cache)
    for b, n in enumerate(lens):
        alone = jnp.concatenate([tokens[b:b + 1, :n], nxt[b:b + 1]], axis=1)
        ref, _, _ = model.apply({"params": params}, alone)
        _close(logits[b, :n], ref[0, :n])
        _close(step[b, 0], ref[0, n])


def test_rollback_then_continue_equals_fresh_prefill(tiny_config):
    cfg, model, params = _setup(tiny_config, "llama")
    tokens = _tokens(cfg, 2, 10)
    cache = KVCache.create(cfg, 2, 16)
    _, _, cache = model.apply({"params": params}, tokens, cache=cache)
    cache = cache.with_lengths(jnp.array([6, 8]))  # reject the rest
    nxt = jnp.array([[20], [21]])
    step, _, _ = model.apply({"params": params}, nxt, cache=cache)
    for b, n in enumerate([6, 8]):
        ref, _, _ = model.apply({"params": params},
                                jnp.concatenate([tokens[b:b + 1, :n], nxt[b:b + 1]], axis=1))
        _close(step[b, 0], ref[0, -1])


def test_sharded_forward_equals_single_device(tiny_config):
    cfg, model, params = _setup(tiny_config, "qwen2")
    tokens = _tokens(cfg, 4, 8)
    ref, _, _ = model.apply({"params": params}, tokens)
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2)
    mesh = make_mesh(mesh_cfg)
    sharded = init_params(cfg, jax.random.key(0), mesh=mesh, rules=mesh_cfg.rules())
    q = sharded["layers"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape[1] == 32
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

    @jax.jit
    def fwd(p, t):
        with nn.logical_axis_rules(mesh_cfg.rules()):
            return model.apply({"params": p}, t)[0]

    with jax.set_mesh(mesh):
        out = fwd(sharded, jax.device_put(tokens, batch_sharding))
    assert out.sharding.spec[0] == ("data", "fsdp")
    _close(out, ref, atol=1e-5)


def test_scanned_and_unscanned_layers_agree(tiny_config):
    cfg, model, params = _setup(tiny_config, "gemma2")
    ucfg = tiny_config("gemma2", "model.scan_layers=false")
    umodel = _Jitted(ucfg)
    uparams = unstack_layers(params, cfg.num_layers)
    assert jax.tree.structure(uparams) == jax.tree.structure(
        init_params(ucfg, jax.random.key(0)))
    tokens = _tokens(cfg, 2, 10)
    cache = KVCache.create(cfg, 2, 12)
    a, _, ca = model.apply({"params": params}, tokens, cache=cache)
    b, _, cb = umodel.apply({"params": uparams}, tokens, cache=cache)
    _close(a, b, atol=1e-5)
    _close(ca.k, cb.k, atol=1e-5)
    restacked = stack_layers(uparams, cfg.num_layers)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), restacked, params))
    # On CPU, decoding goes through the unrolled layout; an unrolled model is left as is.
    dmodel, dparams = decode_layout(Transformer(cfg), params)
    assert not dmodel.config.scan_layers
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), dparams, uparams))
    assert decode_layout(Transformer(ucfg), uparams)[1] is uparams


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policy_keeps_loss_and_grads(tiny_config, policy):
    cfg, model, params = _setup(tiny_config, "llama")
    rmodel = _Jitted(tiny_config("llama", f"model.remat_policy={policy}"))
    tokens = _tokens(cfg, 2, 8)

    def loss(m):
        return lambda p: m.module.apply({"params": p}, tokens)[0].mean()

    la, ga = jax.value_and_grad(loss(model))(params)
    lb, gb = jax.value_and_grad(loss(rmodel))(params)
    _close(la, lb, atol=1e-6)
    jax.tree.map(lambda x, y: _close(x, y, atol=1e-6), ga, gb)


def test_packed_segments_do_not_attend_across(tiny_config):
    cfg, model, params = _setup(tiny_config, "llama")
    a, b = _tokens(cfg, 1, 5, seed=2), _tokens(cfg, 1, 7, seed=3)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])
    out, _, _ = model.apply({"params": params}, packed, positions=pos, segment_ids=seg)
    ra, _, _ = model.apply({"params": params}, a)
    rb, _, _ = model.apply({"params": params}, b)
    _close(out[0, :5], ra[0])
    _close(out[0, 5:], rb[0])


def test_tree_mask_over_cache_equals_causal_path(tiny_config):
    cfg, model, params = _setup(tiny_config, "llama")
    prefix = _tokens(cfg, 1, 6)
    nodes = jnp.array([[30, 31, 32, 33]])      # tree: 0 -> (1, 2), 1 -> 3
    parent = [-1, 0, 0, 1]
    depth = [0, 1, 1, 2]
    mask = np.zeros((4, 4), bool)
    for i in range(4):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parent[j]
    cache = KVCache.create(cfg, 1, 16)
    _, _, cache = model.apply({"params": params}, prefix, cache=cache)
    cache = cache.advance(6)
    out, _, _ = model.apply({"params": params}, nodes, cache=cache,
                            positions=6 + jnp.array([depth]), attention_mask=jnp.asarray(mask))
    for node, path in [(3, [0, 1, 3]), (2, [0, 2])]:
        seq = jnp.concatenate([prefix, nodes[:, path]], axis=1)
        ref, _, _ = model.apply({"params": params}, seq)
        _close(out[0, node], ref[0, -1])


def test_embeddings_input_equals_tokens(tiny_config):
    cfg, model, params = _setup(tiny_config, "gemma")
    tokens = _tokens(cfg, 2, 6)
    emb = model.module.apply({"params": params}, tokens, method=Transformer.embed_tokens)
    a, _, _ = model.apply({"params": params}, tokens)
    b, _, _ = model.apply({"params": params}, embeddings=emb)
    _close(a, b, atol=1e-6)


def test_sliding_window_limits_receptive_field(tiny_config):
    # Mistral: window 4, 2 layers -> position p sees tokens >= p - 2 * 3.
    cfg, model, params = _setup(tiny_config, "mistral")
    tokens = _tokens(cfg, 1, 12)
    changed = tokens.at[0, 0].set(7)
    a, _, _ = model.apply({"params": params}, tokens)
    b, _, _ = model.apply({"params": params}, changed)
    diff = np.abs(np.asarray(a - b)).max(axis=-1)[0]
    assert (diff[7:] == 0).all() and (diff[:7] > 0).all()
    gcfg, gmodel, gparams = _setup(tiny_config, "llama")
    ga, _, _ = gmodel.apply({"params": gparams}, tokens)
    gb, _, _ = gmodel.apply({"params": gparams}, changed)
    assert (np.abs(np.asarray(ga - gb)).max(axis=-1) > 0).all()


def test_sliding_window_in_decode_uses_cache_positions(tiny_config):
    cfg, model, params = _setup(tiny_config, "gemma2")
    assert cfg.layer_windows() == [4, 0, 4]
    tokens = _tokens(cfg, 1, 10)
    full, _, _ = model.apply({"params": params}, tokens)
    cache = KVCache.create(cfg, 1, 10)
    _, _, cache = model.apply({"params": params}, tokens[:, :9], cache=cache)
    step, _, _ = model.apply({"params": params}, tokens[:, 9:], cache=cache.advance(9))
    _close(step[0, 0], full[0, 9])


def test_gemma2_soft_capping_and_tying(tiny_config):
    cfg, model, params = _setup(tiny_config, "gemma2")
    assert "lm_head" not in params and "attn_post_norm" in params["layers"]
    logits, _, _ = model.apply({"params": params}, _tokens(cfg, 2, 8))
    assert float(jnp.abs(logits).max()) <= cfg.final_logit_softcap
    uncapped = _Jitted(tiny_config("gemma2", "model.attn_logit_softcap=0",
                                       "model.final_logit_softcap=0"))
    u, _, _ = uncapped.apply({"params": params}, _tokens(cfg, 2, 8))
    assert float(jnp.abs(u - logits).max()) > 1e-3


def test_qwen2_biases_and_gemma_norms(tiny_config):
    cfg, _, params = _setup(tiny_config, "qwen2")
    assert params["layers"]["attn"]["q_proj"]["bias"].shape == (cfg.num_layers, 4, 16)
    assert "lm_head" not in params
    gcfg, _, gparams = _setup(tiny_config, "gemma")
    assert float(jnp.abs(gparams["final_norm"]["scale"]).max()) == 0.0  # (1 + w), w = 0
    assert gparams["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 64, 4, 32)


def _hf_llama3_inv_freq(theta, dim, factor, low, high, old_ctx):
    """A NumPy port of transformers' ``_compute_llama3_parameters``."""
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    low_freq_wavelen = old_ctx / low
    high_freq_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_freq_llama)


def test_llama3_rope_scaling_matches_reference_formula(tiny_config):
    cfg = tiny_config("llama3_rope")
    rs = cfg.rope_scaling
    ref = _hf_llama3_inv_freq(cfg.rope_theta, cfg.resolved_head_dim, rs.factor,
                              rs.low_freq_factor, rs.high_freq_factor,
                              rs.original_max_position_embeddings)
    np.testing.assert_allclose(np.asarray(rope_inv_freq(cfg)), ref, rtol=1e-5)
    plain = rope_inv_freq(tiny_config("llama", "model.rope_theta=500000.0"))
    assert not np.allclose(np.asarray(plain), ref)


def test_bf16_compute_with_fp32_params(tiny_config):
    cfg, model, params = _setup(tiny_config, "llama", "model.dtype=bfloat16")
    assert params["embed"]["embedding"].dtype == jnp.float32
    logits, hidden, cache = model.apply({"params": params}, _tokens(cfg, 2, 6),
                                        cache=KVCache.create(cfg, 2, 8))
    assert logits.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
    assert cache.k.dtype == jnp.bfloat16
    ref, _, _ = _Jitted(tiny_config("llama")).apply({"params": params}, _tokens(cfg, 2, 6))
    _close(logits, ref, atol=0.1)
