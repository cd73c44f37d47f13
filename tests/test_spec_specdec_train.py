"""SpecDec++ head training: labels, the weighted loss going down, save/load of the head."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.decode.specdec_head import load_accept_head, save_accept_head
from cadenza.errors import CadenzaError
from cadenza.models import Transformer, init_params
from cadenza.train.specdec_task import specdec_examples, train_accept_head

examples = jax.jit(specdec_examples, static_argnums=(0, 2))


def models(tiny_config):
    tcfg = tiny_config("llama", "model.vocab_size=64")
    dcfg = tiny_config("llama", "model.vocab_size=64", "model.num_layers=1",
                       "model.hidden_size=32", "model.intermediate_size=64")
    return (Transformer(tcfg), init_params(tcfg, jax.random.key(0)),
            Transformer(dcfg), init_params(dcfg, jax.random.key(1)))


def test_labels_are_acceptance_probabilities(tiny_config):
    target, tp, draft, dp = models(tiny_config)
    tokens = jax.random.randint(jax.random.key(2), (4, 16), 0, 64)
    inputs, labels, mask = examples(target, tp, draft, dp, tokens, jax.random.key(3))
    assert inputs.shape == labels.shape == mask.shape == (4, 16)
    assert float(labels.min()) >= 0 and float(labels.max()) <= 1
    assert 0.6 < float(mask[:, 1:].mean()) < 0.98          # 15% kept as the true token
    kept = np.asarray(mask) == 0
    np.testing.assert_array_equal(np.asarray(inputs)[kept], np.asarray(tokens)[kept])
    _, same, _ = examples(target, tp, target, tp, tokens, jax.random.key(3))
    np.testing.assert_allclose(same[:, 1:], 1.0, atol=1e-5)   # draft == target: always accepted


def test_head_loss_decreases_and_round_trips(tiny_config, tmp_path):
    target, tp, draft, dp = models(tiny_config)
    data = jax.random.randint(jax.random.key(4), (8, 4, 24), 0, 64)
    head, losses = train_accept_head(target, tp, draft, dp, itertools.cycle(list(data)),
                                     steps=40, learning_rate=3e-3)
    assert np.mean(losses[-8:]) < np.mean(losses[:8])
    save_accept_head(tmp_path / "head", head, draft.config.hidden_size)
    back, blocks = load_accept_head(tmp_path / "head", draft.config)
    assert blocks == 3
    for a, b in zip(jax.tree.leaves(head), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(jnp.asarray(b)))
    with pytest.raises(CadenzaError, match="hidden_size: the head has 32, the draft model has 64"):
        load_accept_head(tmp_path / "head", target.config)
