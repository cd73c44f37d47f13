"""Adapters on mixture-of-experts models: LoRA on the expert projections (per-expert factors
applied as grouped matmuls), QLoRA with quantised expert weights, expert-parallel sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cadenza.config import MeshConfig, load_config
from cadenza.errors import CadenzaError
from cadenza.models import Transformer, init_params, param_shardings
from cadenza.models.families import family_overrides
from cadenza.train import peft
from cadenza.train.mesh import make_mesh
from cadenza.train.peft.artifacts import load_adapters, peft_export, save_adapters
from cadenza.train.peft.merge import merge
from cadenza.train.peft.task import peft_task

EXPERTS = r".*attn\.q_proj|.*mlp\.(gate|up|down)_proj"


def _setup(family, *overrides):
    cfg = load_config(None, family_overrides(family) + list(overrides), preset="tiny")
    params = init_params(cfg.model, jax.random.key(0))
    return cfg, params, *peft.prepare(cfg, params, jax.random.key(1))


def _loss(pm, trainable, frozen, tokens):
    logp = jax.nn.log_softmax(pm.apply(trainable, frozen, tokens[:, :-1])[0])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


@pytest.mark.parametrize("family, overrides", [
    ("qwen3_moe", ("peft.method=lora", f"peft.targets={EXPERTS}")),
    ("mixtral", ("peft.method=qlora",)),  # default targets: every projection, experts included
])
def test_adapters_train_save_load_and_merge(family, overrides, tmp_path):
    cfg, _, pm, trainable, frozen = _setup(family, *overrides)
    if cfg.model.is_moe:
        site = next(s for s in pm.sites if s.name == "layers.mlp.down_proj")
        assert site.experts == cfg.model.num_experts
        a = trainable["peft"]["layers"]["mlp"]["down_proj"]["lora_a"]
        assert a.shape == (cfg.model.num_layers, cfg.model.num_experts, cfg.model.expert_size,
                           cfg.peft.rank)
    if pm.method == "qlora" and cfg.model.is_moe:
        codes = frozen["peft"]["layers"]["mlp"]["up_proj"]["quant_codes"]
        assert codes.shape[:2] == (cfg.model.num_layers, cfg.model.num_experts)
        assert "kernel" not in frozen["params"]["layers"]["mlp"]["up_proj"]
    tokens = jax.random.randint(jax.random.key(2), (4, 13), 3, cfg.model.vocab_size)
    tx = optax.adam(1e-2)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state):
        loss, grads = jax.value_and_grad(lambda t: _loss(pm, t, frozen, tokens))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(4):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.02, losses
    save_adapters(tmp_path / "ad", cfg, trainable)
    _, back = load_adapters(tmp_path / "ad", cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 back, trainable)
    # The PEFT train task's forward, with the router losses added like full fine-tuning.
    batch = {"inputs": tokens, "positions": None, "segment_ids": None}
    adapted, aux = peft_task(cfg).apply_with_aux(back, frozen, batch, None)
    assert set(aux) == {"router_load_balancing", "router_z_loss"}
    assert float(aux["router_load_balancing"][0]) > 0
    merged = Transformer(cfg.model).apply({"params": merge(pm, back, frozen)}, tokens)[0]
    np.testing.assert_allclose(np.asarray(merged), np.asarray(adapted), atol=2e-4, rtol=1e-4)


def test_expert_lora_on_a_data_expert_tensor_mesh_equals_single_device():
    cfg, params, pm, trainable, frozen = _setup("mixtral", "peft.method=lora",
                                                f"peft.targets={EXPERTS}")
    trainable = jax.tree.map(lambda a: a + 0.1, trainable)  # B != 0: the experts' deltas count
    mesh_cfg = MeshConfig(data=2, expert=2, tensor=2)
    mesh, rules = make_mesh(mesh_cfg), mesh_cfg.rules()
    shardings, _ = pm.shardings(mesh, rules)
    tr_s = jax.device_put(trainable, shardings)
    fr_s = {"params": jax.device_put(params, param_shardings(cfg.model, mesh, rules))}
    b = tr_s["peft"]["layers"]["mlp"]["gate_proj"]["lora_b"]
    assert b.sharding.spec == jax.sharding.PartitionSpec(None, "expert", None, "tensor")
    tokens = jax.random.randint(jax.random.key(2), (4, 9), 3, cfg.model.vocab_size)

    @jax.jit
    def loss_grad(t, f, x):
        with nn.logical_axis_rules(rules):
            return jax.value_and_grad(lambda t: _loss(pm, t, f, x))(t)

    with jax.set_mesh(mesh):
        loss_s, grads_s = loss_grad(tr_s, fr_s, tokens)
    loss, grads = jax.jit(jax.value_and_grad(lambda t: _loss(pm, t, frozen, tokens)))(trainable)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
    # rtol 5e-5: flat matmuls and the merged-kernel LoRA projection (q_proj) sum in another
    # order on the mesh (about 2e-5 relative with these large adapters); a sharding bug is O(1)
    for gs, g in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads)):
        np.testing.assert_allclose(gs, g, rtol=5e-5, atol=1e-5)


def test_peft_export_refuses_expert_adapters(tmp_path):
    cfg = load_config(None, family_overrides("olmoe") + ["peft.method=lora",
                                                         "peft.targets=.*_proj"], preset="tiny")
    pm = peft.build(cfg.model, cfg.peft)
    with pytest.raises(CadenzaError, match="expert projections") as e:
        peft_export(tmp_path / "hf", pm, {})
    assert e.value.where == "peft.targets"
    assert not (tmp_path / "hf").exists()
