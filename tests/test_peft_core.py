"""PEFT forward semantics: identities at init, merging, prompts and prefixes, NF4, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.config import load_config
from cadenza.errors import CadenzaError, ConfigError
from cadenza.models import Transformer, init_params, quant
from cadenza.train import peft
from cadenza.train.peft import merge


def _setup(method, *overrides, family_overrides=()):
    cfg = load_config(None, [f"peft.method={method}", *family_overrides, *overrides],
                      preset="tiny")
    params = init_params(cfg.model, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, cfg.model.vocab_size)
    return cfg, params, tokens


def _base_logits(cfg, params, tokens, **kw):
    return jax.jit(lambda p, t: Transformer(cfg.model).apply({"params": p}, t, **kw)[0])(
        params, tokens)


def _randomize(tree, key, scale=0.05):
    """Every trainable leaf perturbed (LoRA B no longer zero, (IA)3 no longer one)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])


GEMMA2_UNSCANNED = ("model.family=gemma2", "model.norm_plus_one=true", "model.post_norms=true",
                    "model.activation=gelu_tanh", "model.tie_embeddings=true",
                    "model.scale_embeddings=true", "model.head_dim=32", "model.sliding_window=4",
                    "model.local_layers=even", "model.attn_logit_softcap=5.0",
                    "model.scan_layers=false")


@pytest.mark.parametrize("family", [(), GEMMA2_UNSCANNED], ids=["llama", "gemma2_unscanned"])
def test_lora_with_zero_b_is_the_base_exactly(family):
    cfg, params, tokens = _setup("lora", "peft.targets=.*_proj", family_overrides=family)
    pm, trainable, frozen = peft.prepare(cfg, params, jax.random.key(1))
    flat = jax.tree_util.tree_flatten_with_path(trainable)[0]
    assert len(flat) == 2 * 7 * (1 if cfg.model.scan_layers else cfg.model.num_layers)
    for path, x in flat:
        assert (float(jnp.abs(x).max()) == 0) == (path[-1].key == "lora_b")
    out = jax.jit(pm.apply)(trainable, frozen, tokens)[0]
    np.testing.assert_array_equal(out, _base_logits(cfg, params, tokens))


def test_qlora_with_zero_b_is_the_dequantised_base():
    cfg, params, tokens = _setup("qlora")
    pm, trainable, frozen = peft.prepare(cfg, params, jax.random.key(1))
    assert "kernel" not in frozen["params"]["layers"]["attn"]["q_proj"]
    out = jax.jit(pm.apply)(trainable, frozen, tokens)[0]
    # same math; the two programs fuse the dequantisation differently (f32 rounding only)
    np.testing.assert_allclose(out, _base_logits(cfg, pm.dequantized_params(frozen), tokens),
                               atol=1e-5, rtol=0)
    # the quantised base is close to the original one, not identical
    q_err = jnp.abs(pm.dequantized_params(frozen)["layers"]["mlp"]["up_proj"]["kernel"]
                    - params["layers"]["mlp"]["up_proj"]["kernel"])
    assert 0 < float(q_err.max()) < 0.2 * float(jnp.abs(params["layers"]["mlp"]["up_proj"]
                                                        ["kernel"]).max())


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_dora_and_ia3_start_as_the_base(method):
    cfg, params, tokens = _setup(method)
    pm, trainable, frozen = peft.prepare(cfg, params, jax.random.key(1))
    out = jax.jit(pm.apply)(trainable, frozen, tokens)[0]
    np.testing.assert_allclose(out, _base_logits(cfg, params, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method, extra", [
    ("lora", ("peft.targets=.*_proj", "peft.rslora=true")),
    ("dora", ()),
    ("ia3", ()),
    ("qlora", ("peft.quant_type=int8", "peft.double_quant=false")),
])
def test_merged_equals_unmerged(method, extra):
    cfg, params, tokens = _setup(method, *extra)
    pm, trainable, frozen = peft.prepare(cfg, params, jax.random.key(1))
    trainable = _randomize(trainable, jax.random.key(3))
    adapted = jax.jit(pm.apply)(trainable, frozen, tokens)[0]
    merged = merge.merge(pm, trainable, frozen)
    np.testing.assert_allclose(_base_logits(cfg, merged, tokens), adapted, atol=2e-5, rtol=1e-5)
    if method == "dora":
        with pytest.raises(CadenzaError, match="cannot be unmerged"):
            merge.unmerge(pm, trainable, merged)
    elif method != "qlora":
        back = merge.unmerge(pm, trainable, merged)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_soft_prompt_of_real_embeddings_equals_hard_prompt():
    ids = [5, 17, 3, 99]
    cfg, params, tokens = _setup("prompt", "peft.num_virtual_tokens=4", "peft.prompt_init=tokens",
                                 f"peft.prompt_init_ids=[{','.join(map(str, ids))}]",
                                 family_overrides=GEMMA2_UNSCANNED[:6])
    pm, trainable, frozen = peft.prepare(cfg, params, jax.random.key(1))
    soft = jax.jit(pm.apply)(trainable, frozen, tokens)[0]
    hard = jnp.concatenate([jnp.broadcast_to(jnp.asarray(ids), (2, 4)), tokens], axis=1)
    np.testing.assert_allclose(soft, _base_logits(cfg, params, hard)[:, 4:], atol=1e-5)


@pytest.mark.parametrize("method, extra", [
    ("prefix", ()), ("prefix", ("peft.prefix_projection=true",)), ("prompt", ())])
def test_virtual_tokens_in_cache_match_the_uncached_forward(method, extra):
    cfg, params, tokens = _setup(method, "peft.num_virtual_tokens=3", *extra)
    pm, trainable, frozen = peft.prepare(cfg, params, jax.random.key(1))
    full = jax.jit(pm.apply)(trainable, frozen, tokens)[0]
    cache = pm.init_cache(trainable, frozen, batch=2, max_len=16)
    assert cache.lengths.tolist() == [3, 3]
    step = jax.jit(lambda t, f, x, c: pm.apply(t, f, x, cache=c))
    head, _, cache = step(trainable, frozen, tokens[:, :5], cache)
    tail, _, _ = step(trainable, frozen, tokens[:, 5:], cache.advance(5))
    np.testing.assert_allclose(jnp.concatenate([head, tail], 1), full, atol=1e-5)
    # the virtual tokens change the output (they are not ignored)
    assert float(jnp.abs(full - _base_logits(cfg, params, tokens)).max()) > 1e-3


def test_prefix_is_seen_by_every_packed_segment():
    cfg, params, tokens = _setup("prefix", "peft.num_virtual_tokens=2")
    pm, trainable, frozen = peft.prepare(cfg, params, jax.random.key(1))
    seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 2]] * 2)
    pos = jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 3]] * 2)
    packed = pm.apply(trainable, frozen, tokens, segment_ids=seg, positions=pos)[0]
    alone = pm.apply(trainable, frozen, tokens[:, 4:])[0]
    np.testing.assert_allclose(packed[:, 4:], alone, atol=1e-5)


def test_nf4_levels_and_round_trip():
    table = [-1, -.6962, -.5251, -.3949, -.2844, -.1848, -.0911, 0, .0796, .1609, .2461, .3379,
             .4407, .5626, .7230, 1]
    np.testing.assert_allclose(quant.nf4_levels(), table, atol=1e-4)
    # values that are exactly levels times a block absmax come back exactly
    levels = jnp.asarray(quant.nf4_levels())
    idx = jax.random.randint(jax.random.key(0), (4, 64), 0, 16).at[:, 0].set(15)
    w = (levels[idx] * jnp.asarray([1.0, 2.0, 0.5, 4.0])[:, None]).reshape(16, 16)
    q = quant.quantize(w, "nf4", 64, False, 256)
    assert q[quant.QUANT_CODES].dtype == jnp.uint8 and q[quant.QUANT_CODES].size == 128
    np.testing.assert_array_equal(quant.dequantize(q, w.shape, "nf4", 64, 256), w)
    # random weights: error within half the widest level gap of each block's absmax
    w = jax.random.normal(jax.random.key(1), (30, 50))  # 1500 values: a padded last block
    for qt, dq, tol in (("nf4", False, 0.14), ("nf4", True, 0.15), ("int8", True, 0.01)):
        q = quant.quantize(w, qt, 64, dq, 4)
        back = quant.dequantize(q, w.shape, qt, 64, 4)
        assert back.shape == w.shape
        assert float(jnp.abs(back - w).max()) < tol * float(jnp.abs(w).max()), qt


@pytest.mark.parametrize("overrides, match", [
    (["peft.method=lora", "peft.targets=.*attn\\.nothing"], "matches no projection"),
    (["peft.method=lora", "peft.rank=65"], "exceeds the size"),
    (["peft.method=lora", "peft.rank=0"], "1 <= rank"),
    (["peft.method=lora", "peft.targets=(unclosed"], "invalid regex"),
    (["peft.method=prompt", "peft.targets=.*"], "takes no targets"),
])
def test_bad_peft_config_fails_before_compiling(overrides, match):
    with pytest.raises(ConfigError, match=match):
        cfg = load_config(None, overrides, preset="tiny")
        peft.build(cfg.model, cfg.peft)


def test_base_params_for_another_model_are_rejected():
    cfg, params, _ = _setup("lora")
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hidden_size=32))
    with pytest.raises(CadenzaError, match="has shape"):
        peft.prepare(other, params, jax.random.key(1))


def test_merged_kernel_lora_matches_the_unmerged_forward_and_gradients():
    from cadenza.train.peft.model import lora_projection

    k = jax.random.split(jax.random.key(3), 5)
    x = jax.random.normal(k[0], (2, 3, 4, 5))           # [B, T, *in] with two input dims
    w = jax.random.normal(k[1], (4, 5, 6))
    a, b = jax.random.normal(k[2], (4, 5, 2)), jax.random.normal(k[3], (2, 6))
    dy = jax.random.normal(k[4], (2, 3, 6))

    def unmerged(x, w, a, b):
        return (jnp.einsum("btij,ijo->bto", x, w)
                + 0.5 * jnp.einsum("btr,ro->bto", jnp.einsum("btij,ijr->btr", x, a), b))

    def merged(x, w, a, b):
        return lora_projection(x, w, a, b, 0.5)

    want_y, want_vjp = jax.vjp(unmerged, x, w, a, b)
    got_y, got_vjp = jax.vjp(merged, x, w, a, b)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
    for got, want in zip(got_vjp(dy), want_vjp(dy)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
