"""Selective fine-tuning (peft.method partial | lisa | hft): frozen params stay bit for bit,
within a LISA period only the sampled layers change, LISA's optimizer state scales with
gamma / L, and a resumed run samples exactly like an uninterrupted one."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cadenza.config import load_config
from cadenza.errors import ConfigError
from cadenza.models import abstract_params, load_model
from cadenza.train import fit
from cadenza.train.peft.selective import param_path, selective_optimizer
from cadenza.train.synthetic import SyntheticBatches

LAYERS = 4


def peft(*overrides):
    return load_config(None, [f"model.num_layers={LAYERS}", *overrides], preset="tiny")


def run(config, steps, seed=0):
    """``steps`` AdamW updates with random gradients; the params after each step."""
    abstract = abstract_params(config.model)
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), abstract)
    tx = selective_optimizer(optax.adamw(1e-2), abstract, config.peft, LAYERS, seed=3)
    state = tx.init(params)

    @jax.jit
    def step(params, state, key):
        ks = iter(jax.random.split(key, 100))
        grads = jax.tree.map(lambda p: jax.random.normal(next(ks), p.shape, p.dtype), params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    history = [params]
    for i in range(steps):
        params, state = step(params, state, next(keys))
        history.append(params)
    return history, state


def changed(a, b):
    """{param path: bool [L] (stacked: which layers changed) or bool}."""
    out = {}
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        diff = np.asarray(x != y)
        name = param_path(path)
        out[name] = diff.reshape(LAYERS, -1).any(1) if name.startswith("layers.") else diff.any()
    return out


def test_partial_trains_only_the_matching_params_and_layers():
    config = peft("peft.method=partial", "peft.trainable=layers\\.mlp\\..*|lm_head\\..*",
                  "peft.trainable_layers=[1, 3]")
    history, _ = run(config, 3)
    for name, c in changed(history[0], history[-1]).items():
        if name.startswith("layers.mlp."):
            assert list(c) == [False, True, False, True], name
        else:
            assert np.all(c == (name == "lm_head.kernel")), name
    with pytest.raises(ConfigError, match="matches no param"):
        run(peft("peft.method=partial", "peft.trainable=nothing"), 1)
    with pytest.raises(ConfigError, match="does not read"):
        peft("peft.method=lisa", "peft.trainable=.*")


def test_lisa_changes_only_the_sampled_layers_within_a_period():
    config = peft("peft.method=lisa", "peft.lisa_layers=1", "peft.period=2")
    history, state = run(config, 8)
    samples = []
    for start in range(0, 8, 2):
        period = changed(history[start], history[start + 2])
        layers = {tuple(v) for k, v in period.items() if k.startswith("layers.")}
        assert len(layers) == 1 and sum(next(iter(layers))) == 1   # one layer, every param
        assert period["embed.embedding"] and period["lm_head.kernel"]
        samples.append(int(np.argmax(next(iter(layers)))))
        # both steps of the period moved that layer only
        step = changed(history[start], history[start + 1])
        assert tuple(step["layers.attn.q_proj.kernel"]) == next(iter(layers))
    assert len(set(samples)) > 1, samples          # resampled across periods
    assert int(state.layers[0]) == samples[-1]


def test_lisa_optimizer_state_scales_with_gamma():
    abstract = abstract_params(peft().model)

    def layer_state_bytes(gamma):
        tx = selective_optimizer(optax.adam(1e-3), abstract,
                                 peft("peft.method=lisa", f"peft.lisa_layers={gamma}").peft,
                                 LAYERS)
        state = jax.eval_shape(tx.init, abstract)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.inner)
                   if x.ndim and x.shape[0] == gamma and x.ndim > 1)
    full = sum(x.size * 4 for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]
               if param_path(p).startswith("layers.")) * 2          # Adam: two moments
    assert layer_state_bytes(1) * LAYERS == full
    assert layer_state_bytes(2) * LAYERS == 2 * full


def test_hft_freezes_half_of_the_matrices_per_stage():
    config = peft("peft.method=hft", "peft.period=3")
    history, _ = run(config, 6)
    for start in (0, 3):
        stage = changed(history[start], history[start + 3])
        units = [u for v in stage.values() for u in np.atleast_1d(v)]
        assert sum(units) == len(units) // 2
    assert changed(history[0], history[3]) != changed(history[3], history[6])


def test_lisa_resume_restores_the_sampling(tmp_path):
    def train(out, steps, **kw):
        config = load_config(None, [
            f"model.num_layers={LAYERS}", "peft.method=lisa", "peft.lisa_layers=1",
            "peft.period=2", f"train.output_dir={out}", f"train.steps={steps}",
            "train.batch_size=2", "train.seq_len=16", "train.schedule=constant",
            "train.warmup_steps=0", "train.learning_rate=1e-2", "train.log_every=1",
            "train.progress_bar=false", "train.tensorboard=false",
            "train.async_checkpoints=false", "mesh.data=1"], preset="tiny")
        data = SyntheticBatches(2, 16, config.model.vocab_size, seed=0)
        return fit(config, data=data, devices=jax.devices()[:1], **kw)

    straight = train(tmp_path / "straight", 6)
    train(tmp_path / "resumed", 3)
    resumed = train(tmp_path / "resumed", 6, allow_changes=True)   # train.steps 3 -> 6
    assert resumed["resumed_from"] == 3
    a, b = load_model(straight["model_dir"])[1], load_model(resumed["model_dir"])[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    losses = [json.loads(line)["loss"] for line in
              (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6


@pytest.mark.parametrize("name", ["tiny_dpo", "tiny_orpo", "tiny_lisa", "tiny_sft_shaped",
                                  "llama3_8b_lora_dpo"])
def test_post_training_configs_load(name):
    config = load_config(name, ["data.path=pairs.jsonl"])
    assert config.name == name
