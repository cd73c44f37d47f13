"""Train-step pieces: masked loss, gradient accumulation, optimizers and their shardings,
schedules, the FLOPs formula and config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.config import load_config
from cadenza.errors import ConfigError
from cadenza.train import SyntheticBatches
from cadenza.train.mesh import batch_sharding, make_mesh, replicated, validate_sharding
from cadenza.train.metrics import flops_per_token, matmul_params
from cadenza.train.optim import make_optimizer, make_schedule
from cadenza.train.state import init_state, state_shardings
from cadenza.train.step import make_train_step, token_losses
from cadenza.train.task import full_model_task


def _config(*overrides):
    return load_config(None, ["train.batch_size=8", "train.seq_len=16", "train.warmup_steps=0",
                              "train.learning_rate=1e-2", *overrides], preset="tiny")


def _run(config, devices, steps=1):
    """``steps`` train steps on a synthetic stream; returns the final state and metrics."""
    mesh = make_mesh(config.mesh, devices)
    rules = config.mesh.rules()
    task, opt = full_model_task(config.model), make_optimizer(config.train)
    shardings = state_shardings(task, opt, mesh, rules)
    state = init_state(task, opt, 0, mesh, rules, shardings)
    rows = batch_sharding(mesh, rules)
    step = make_train_step(task, opt, make_schedule(config.train),
                           microbatches=config.train.microbatches, z_loss=config.train.z_loss,
                           rules=rules, state_shardings=shardings, frozen_shardings={},
                           batch_sharding=rows, metric_sharding=replicated(mesh))
    data = SyntheticBatches(8, 16, config.model.vocab_size)
    history = []
    with jax.set_mesh(mesh):
        for _ in range(steps):
            batch = {k: jax.device_put(v, rows) for k, v in next(data).items()}
            state, metrics = step(state, {}, batch)
            history.append(jax.device_get(metrics))
    return state, history


def test_token_losses_mask_and_empty():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 7))
    targets = jnp.array([[1, 2, 3], [4, 5, 6]])
    mask = jnp.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    obj, ce, n = token_losses(logits, targets, mask)
    full = -jax.nn.log_softmax(logits)[jnp.arange(2)[:, None], jnp.arange(3), targets]
    assert float(n) == 3.0
    np.testing.assert_allclose(float(ce), float((full * mask).sum()), rtol=1e-6)
    assert float(obj) == float(ce)
    obj_z, _, _ = token_losses(logits, targets, mask, z_loss=0.1)
    lse = jax.nn.logsumexp(logits, -1)
    np.testing.assert_allclose(float(obj_z - obj), 0.1 * float((lse ** 2 * mask).sum()),
                               rtol=1e-5)
    _, ce0, n0 = token_losses(logits, targets, jnp.zeros_like(mask))
    assert float(ce0) == 0.0 and float(n0) == 0.0


@pytest.mark.parametrize("z_loss", [0.0, 0.01])
def test_token_losses_gradients_match_the_plain_formula(z_loss):
    # token_losses has a hand-written VJP: it must equal autodiff of the plain formula for
    # any mix of the three outputs' cotangents, in the logits and in the mask
    k = jax.random.split(jax.random.key(1), 3)
    logits = 3 * jax.random.normal(k[0], (2, 5, 11))
    targets = jax.random.randint(k[1], (2, 5), 0, 11)
    mask = jnp.where(jax.random.uniform(k[2], (2, 5)) > 0.3, 1.5, 0.0)

    def plain(logits, targets, mask):
        lse = jax.nn.logsumexp(logits, axis=-1)
        ce = (lse - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]) * mask
        return (ce + z_loss * lse ** 2 * mask).sum(), ce.sum(), mask.sum()

    for weights in [(1.0, 0.0, 0.0), (0.3, 0.7, 2.0)]:
        def total(fn):
            return lambda lg, m: sum(w * o for w, o in zip(weights, fn(lg, targets, m)))
        got = jax.grad(total(lambda *a: token_losses(*a, z_loss=z_loss)), (0, 1))(logits, mask)
        want = jax.grad(total(plain), (0, 1))(logits, mask)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_zero_loss_tokens_give_zero_loss_not_nan(one_device_step):
    state, step, mesh = one_device_step(_config("mesh.data=1"))
    batch = next(SyntheticBatches(8, 16, 512))
    batch["loss_mask"][:] = 0
    with jax.set_mesh(mesh):
        _, m = step(state, {}, batch)
    assert float(m["loss"]) == 0.0 and float(m["grad_norm"]) == 0.0 and float(m["finite"]) == 1


def test_grad_accumulation_4x2_equals_batch_8():
    # SGD: the update is linear in the gradient, so params compare the gradients themselves
    # (Adam's first step is ~lr*sign(g), which amplifies rounding in near-zero gradients).
    one, o = jax.devices()[:1], ["mesh.data=1", "train.optimizer=sgd", "train.momentum=0"]
    big, mb = _run(_config(*o), one), _run(_config(*o, "train.microbatches=4"), one)
    np.testing.assert_allclose(big[1][0]["loss"], mb[1][0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(big[1][0]["grad_norm"], mb[1][0]["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(big[0].params), jax.tree.leaves(mb[0].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)


def test_accumulation_on_a_sharded_mesh_matches():
    config = _config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.microbatches=2",
                     "train.optimizer=lion", "train.learning_rate=1e-3")
    state, hist = _run(config, jax.devices(), steps=2)
    ref_state, ref = _run(_config("mesh.data=1", "train.optimizer=lion",
                                  "train.learning_rate=1e-3"), jax.devices()[:1], steps=2)
    np.testing.assert_allclose([h["loss"] for h in hist], [h["loss"] for h in ref], rtol=1e-5)
    # Lion's state is one momentum per param, sharded like the param
    q = state.params["layers"]["attn"]["q_proj"]["kernel"]
    assert state.opt_state[1][0].mu["layers"]["attn"]["q_proj"]["kernel"].sharding == q.sharding


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd"])
def test_optimizer_state_is_sharded_like_params(name):
    config = _config("mesh.data=1", "mesh.fsdp=8", f"train.optimizer={name}",
                     "train.schedule=constant", "train.learning_rate=3e-2")
    mesh = make_mesh(config.mesh)
    rules = config.mesh.rules()
    task, opt = full_model_task(config.model), make_optimizer(config.train)
    shardings = state_shardings(task, opt, mesh, rules)
    state = init_state(task, opt, 0, mesh, rules, shardings)
    # every optimizer-state leaf lies where state_shardings says (moments not on one device)
    for leaf, s in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(shardings.opt_state)):
        assert leaf.sharding == s
    if name == "adamw":
        mu = state.opt_state[1][0].mu["embed"]["embedding"]
        assert mu.sharding == state.params["embed"]["embedding"].sharding
        assert mu.addressable_shards[0].data.shape == (512, 8)


def test_schedules():
    def lrs(*o):
        s = make_schedule(_config("train.steps=100", "train.learning_rate=1.0",
                                  "train.warmup_steps=10", "train.min_lr_ratio=0.1", *o).train)
        return [float(s(i)) for i in (0, 5, 10, 55, 100)]
    np.testing.assert_allclose(lrs(), [0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    np.testing.assert_allclose(lrs("train.schedule=linear"), [0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    np.testing.assert_allclose(lrs("train.schedule=constant"), [0, 0.5, 1, 1, 1], atol=1e-6)


def test_flops_formula():
    cfg = _config().model
    n = matmul_params(cfg)
    assert n == cfg.num_params() - cfg.vocab_size * cfg.hidden_size
    attn = 12 * cfg.num_layers * 16 * cfg.num_heads * cfg.resolved_head_dim
    assert flops_per_token(cfg, 16) == 6 * n + attn
    assert flops_per_token(cfg, 16, trainable_params=100) == 4 * n + 200 + attn
    # Mixture of experts: only the chosen experts' params count (plus the router).
    moe = _config("model.family=mixtral", "model.num_experts=8",
                  "model.num_experts_per_tok=2").model
    expert = 3 * moe.hidden_size * moe.expert_size * moe.num_layers
    assert matmul_params(moe) == n + expert + moe.num_experts * moe.hidden_size * moe.num_layers
    assert moe.num_params() == moe.num_active_params() + 6 * expert


@pytest.mark.parametrize("overrides, where, text", [
    (["mesh.data=3"], "mesh", "multiply to 3, but there are 8 devices"),
    (["mesh.data=-1", "mesh.fsdp=3"], "mesh", "does not divide the 8 devices"),
    (["mesh.data=8", "train.batch_size=4"], "train.batch_size",
     "batch_size=4 is not divisible by the 8 batch shards (data=8*fsdp=1)"),
    (["mesh.data=4", "mesh.tensor=2", "train.microbatches=4"], "train.batch_size",
     "microbatch size 2 (batch_size=8 / microbatches=4) is not divisible by the 4"),
    (["mesh.data=1", "mesh.tensor=8"], "mesh.logical_axis_rules.kv_heads",
     "model.num_kv_heads=2"),
    (["mesh.data=1", "mesh.tensor=8", "mesh.logical_axis_rules.kv_heads=[]"],
     "mesh.logical_axis_rules.heads", "model.num_heads=4"),
    (["mesh.data=1", "mesh.tensor=8", "mesh.logical_axis_rules.heads=[]",
      "mesh.logical_axis_rules.kv_heads=[]", "model.intermediate_size=196"],
     "mesh.logical_axis_rules.mlp", "model.intermediate_size=196"),
    (["mesh.data=1", "mesh.fsdp=8", "model.hidden_size=68", "model.head_dim=16"],
     "mesh.logical_axis_rules.embed", "model.hidden_size=68"),
    (["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "model.vocab_size=511"],
     "mesh.logical_axis_rules.vocab", "model.vocab_size=511"),
    (["mesh.data=4", "mesh.sequence=2", "train.seq_len=15"], "train.seq_len",
     "seq_len=15 is not divisible by the 2 sequence shards"),
])
def test_sharding_validation(overrides, where, text):
    with pytest.raises(ConfigError) as e:
        validate_sharding(_config(*overrides), 8)
    assert e.value.where == where and text in e.value.what and e.value.fix


@pytest.mark.parametrize("overrides, where", [
    (["train.optimizer=adam"], "train.optimizer"),
    (["train.schedule=step"], "train.schedule"),
    (["train.min_lr_ratio=2"], "train.min_lr_ratio"),
    (["train.b2=1.0"], "train.b2"),
    (["train.eval_steps=0"], "train.eval_steps"),
])
def test_train_config_errors(overrides, where):
    with pytest.raises(ConfigError) as e:
        _config(*overrides)
    assert e.value.where == where
