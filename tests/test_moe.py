"""Mixture of experts: dropless routing, expert parallelism, the router losses (their
match with transformers' load-balancing loss is in test_hf_parity.py, which holds the
reference session)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.config import load_config
from cadenza.errors import ConfigError
from cadenza.models import Transformer, init_params
from cadenza.models.moe import MoEMLP, route, router_losses
from cadenza.train import SyntheticBatches
from cadenza.train.config import MeshConfig
from cadenza.train.mesh import make_mesh, validate_sharding


@pytest.mark.parametrize("normalize", [False, True])
def test_dropless_routing_equals_a_dense_per_token_loop(tiny_config, normalize):
    cfg = tiny_config("qwen3_moe", f"model.norm_topk_prob={str(normalize).lower()}")
    x = jax.random.normal(jax.random.key(0), (2, 24, cfg.hidden_size)) + 0.3
    params = nn.meta.unbox(MoEMLP(cfg).init(jax.random.key(1), x)["params"])
    # Skew the router so one expert gets most tokens: nothing may be dropped.
    router = params["router"]["kernel"].at[:, 0].add(0.1)
    params = {**params, "router": {"kernel": router}}
    out = np.asarray(jax.jit(MoEMLP(cfg).apply)({"params": params}, x))
    p = jax.tree.map(np.asarray, params)
    tokens = np.asarray(x).reshape(-1, cfg.hidden_size)
    expected = np.zeros_like(tokens)
    for n, tok in enumerate(tokens):
        logits = tok @ p["router"]["kernel"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = np.argsort(-probs)[:cfg.num_experts_per_tok]
        weights = probs[chosen] / (probs[chosen].sum() if normalize else 1.0)
        for e, w in zip(chosen, weights):
            g, u = tok @ p["gate_proj"]["kernel"][e], tok @ p["up_proj"]["kernel"][e]
            expected[n] += w * ((g / (1 + np.exp(-g))) * u) @ p["down_proj"]["kernel"][e]
    assert np.bincount(np.argmax(tokens @ p["router"]["kernel"], -1)).max() > 30
    np.testing.assert_allclose(out.reshape(-1, cfg.hidden_size), expected, atol=2e-5, rtol=1e-4)


def test_route_picks_the_top_k_probabilities():
    logits = jnp.log(jnp.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    weights, experts = route(logits, 2, normalize=True)
    np.testing.assert_array_equal(experts, [[1, 2], [0, 2]])
    np.testing.assert_allclose(weights, [[2 / 3, 1 / 3], [0.625, 0.375]], rtol=1e-6)


def test_moe_forward_on_a_data_expert_tensor_mesh_equals_single_device(tiny_config):
    cfg = tiny_config("mixtral")
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 8), 3, cfg.vocab_size)
    model = Transformer(cfg)
    ref = jax.jit(model.apply)({"params": params}, tokens)[0]
    mesh_cfg = MeshConfig(data=2, expert=2, tensor=2)
    mesh = make_mesh(mesh_cfg)
    sharded = init_params(cfg, jax.random.key(0), mesh=mesh, rules=mesh_cfg.rules())
    gate = sharded["layers"]["mlp"]["gate_proj"]["kernel"]
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
    assert {s.data.shape for s in gate.addressable_shards} == {(2, 2, 64, 24)}

    @jax.jit
    def fwd(p, t):
        with nn.logical_axis_rules(mesh_cfg.rules()):
            return model.apply({"params": p}, t)[0]

    with jax.set_mesh(mesh):
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        out = fwd(sharded, jax.device_put(tokens, rows))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-4)


def test_z_loss_is_the_mean_squared_logsumexp():
    logits = np.random.default_rng(0).normal(size=(2, 10, 4)).astype(np.float32)
    lse = np.log(np.exp(logits).sum(-1))
    z = router_losses(jnp.asarray(logits), 2)["z_loss"]
    np.testing.assert_allclose(float(z), np.mean(lse ** 2), rtol=1e-5)


def test_router_logits_of_every_layer_are_sown(tiny_config):
    cfg = tiny_config("olmoe")
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.ones((2, 5), jnp.int32)
    _, state = Transformer(cfg).apply({"params": params}, tokens, mutable=["intermediates"])
    (logits,) = state["intermediates"]["layers"]["mlp"]["router_logits"]
    assert logits.shape == (cfg.num_layers, 10, cfg.num_experts)


def test_sharding_validation_names_the_expert_dimension():
    config = load_config(None, ["model.family=mixtral", "model.num_experts=4",
                                "model.num_experts_per_tok=2", "mesh.data=1", "mesh.expert=8",
                                "train.batch_size=8", "train.seq_len=16"], preset="tiny")
    with pytest.raises(ConfigError) as e:
        validate_sharding(config, 8)
    assert e.value.where == "mesh.logical_axis_rules.expert"
    assert "model.num_experts=4" in e.value.what and "expert=8" in e.value.what


def test_dense_families_refuse_experts_and_moe_families_need_them():
    with pytest.raises(ConfigError, match="is dense"):
        load_config(None, ["model.num_experts=4"], preset="tiny")
    with pytest.raises(ConfigError, match="num_experts >= 2"):
        load_config(None, ["model.family=olmoe"], preset="tiny")


def test_train_step_reports_router_losses_and_adds_them_to_the_objective(one_device_step):
    config = load_config(None, ["model.family=mixtral", "model.num_experts=4",
                                "model.num_experts_per_tok=2", "model.router_aux_loss_coef=0.5",
                                "model.router_z_loss_coef=0.01", "model.num_layers=1",
                                "model.vocab_size=64", "train.batch_size=4",
                                "train.seq_len=8", "train.microbatches=2", "mesh.data=1"],
                         preset="tiny")
    state, step, mesh = one_device_step(config)
    with jax.set_mesh(mesh):
        _, m = step(state, {}, next(SyntheticBatches(4, 8, config.model.vocab_size)))
    m = jax.device_get(m)
    assert m["router_load_balancing"] > 0 and m["router_z_loss"] > 0
    np.testing.assert_allclose(
        m["objective"], m["loss"] + 0.5 * m["router_load_balancing"] + 0.01 * m["router_z_loss"],
        rtol=1e-3)


def test_moe_checkpoint_restores_onto_an_expert_parallel_mesh(tiny_config, tmp_path):
    from cadenza.config import ExperimentConfig
    from cadenza.models import load_model, save_model

    cfg = tiny_config("qwen3_moe")
    params = init_params(cfg, jax.random.key(0))
    save_model(tmp_path / "m", ExperimentConfig(model=cfg), params)
    mesh_cfg = MeshConfig(data=2, expert=2, tensor=2)
    _, restored = load_model(tmp_path / "m", mesh=make_mesh(mesh_cfg), rules=mesh_cfg.rules())
    down = restored["layers"]["mlp"]["down_proj"]["kernel"]
    assert down.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "tensor", "fsdp")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored, params)
