"""PEFT training: only adapters are differentiated and hold optimizer state; each method learns."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cadenza.config import MeshConfig, load_config
from cadenza.models import init_params
from cadenza.train import peft
from cadenza.train.mesh import make_mesh


def _batch(cfg, seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (4, 17), 0, cfg.model.vocab_size)
    return tokens[:, :-1], tokens[:, 1:]


def _loss(pm, trainable, frozen, inputs, targets, rng=None):
    logits = pm.apply(trainable, frozen, inputs, dropout_rng=rng)[0]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))


def _trainer(pm, tx):
    @jax.jit
    def step(trainable, frozen, opt_state, inputs, targets, rng):
        loss, grads = jax.value_and_grad(lambda t: _loss(pm, t, frozen, inputs, targets, rng))(
            trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss
    return step


def _setup(method, *overrides):
    cfg = load_config(None, [f"peft.method={method}", *overrides], preset="tiny")
    params = init_params(cfg.model, jax.random.key(0))
    return cfg, params, *peft.prepare(cfg, params, jax.random.key(1))


def test_only_adapters_change_and_hold_optimizer_state():
    cfg, params, pm, trainable, frozen = _setup("lora", "peft.dropout=0.1")
    before = jax.tree.map(np.asarray, params)
    tx = pm.optimizer(optax.adamw(1e-2))
    opt_state = tx.init(trainable)
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    # Adam moments exist for the adapters only: 2 per trainable value (+ a step count)
    assert sum(x.size for x in jax.tree.leaves(opt_state)) == 2 * n_train + 1
    assert n_train < 0.05 * cfg.model.num_params()
    step = _trainer(pm, tx)
    inputs, targets = _batch(cfg)
    t0 = trainable
    for i in range(3):
        trainable, opt_state, _ = step(trainable, frozen, opt_state, inputs, targets,
                                       jax.random.key(i))
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), trainable, t0)
    assert all(jax.tree.leaves(changed))
    print(pm.describe(trainable, frozen))


def test_lora_plus_scales_the_learning_rate_of_b():
    _, _, pm, trainable, _ = _setup("lora_plus", "peft.lora_plus_ratio=4.0")
    tx = pm.optimizer(optax.sgd(0.5))
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        want = -2.0 if path[-1].key == "lora_b" else -0.5
        np.testing.assert_allclose(u, want)
    labels = peft.lora_plus_labels(trainable)
    assert set(jax.tree.leaves(labels)) == {"lora_b", "default"}


@pytest.mark.parametrize("method, extra", [
    ("lora", ()), ("lora_plus", ()), ("dora", ()), ("qlora", ()), ("ia3", ()),
    ("prefix", ("peft.num_virtual_tokens=4",)),
    ("prompt", ("peft.num_virtual_tokens=4", "peft.prompt_init=sample_vocab")),
])
def test_each_method_lowers_the_loss(method, extra):
    cfg, _, pm, trainable, frozen = _setup(method, *extra)
    tx = pm.optimizer(optax.adam(3e-2 if method in ("prompt", "ia3") else 1e-2))
    opt_state = tx.init(trainable)
    step = _trainer(pm, tx)
    inputs, targets = _batch(cfg)
    losses = []
    for i in range(8):
        trainable, opt_state, loss = step(trainable, frozen, opt_state, inputs, targets,
                                          jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses


def test_sharded_lora_matches_single_device():
    cfg, params, pm, trainable, frozen = _setup("lora", "peft.targets=.*_proj")
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    mesh = make_mesh(cfg.mesh)
    rules = cfg.mesh.rules()
    from cadenza.models import param_shardings
    sharded_params = jax.device_put(params, param_shardings(cfg.model, mesh, rules))
    pm_s, tr_s, fr_s = peft.prepare(cfg, sharded_params, jax.random.key(1), mesh=mesh)
    a = tr_s["peft"]["layers"]["mlp"]["up_proj"]["lora_a"]
    assert a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    b = tr_s["peft"]["layers"]["mlp"]["up_proj"]["lora_b"]
    assert b.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
    inputs, targets = _batch(cfg)
    import flax.linen as nn

    @jax.jit
    def loss_grad(t, f, x, y):
        with nn.logical_axis_rules(rules):
            return jax.value_and_grad(lambda t: _loss(pm_s, t, f, x, y))(t)

    with jax.set_mesh(mesh):
        loss_s, grads_s = loss_grad(tr_s, fr_s, inputs, targets)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda t: _loss(pm, t, frozen, inputs, targets)))(trainable)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
    for gs, g in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads)):
        np.testing.assert_allclose(gs, g, atol=1e-5)
