"""Medusa heads: a fresh head reproduces the base logits; tree decoding == plain greedy."""

import jax
import numpy as np
import pytest

from cadenza.decode import DecodeConfig, generate
from cadenza.decode.medusa import Medusa, MedusaHeads, init_medusa_heads
from cadenza.decode.speculative import speculative_generate
from cadenza.errors import CadenzaError
from cadenza.models import Transformer, init_params

PROMPTS = [[1, 17, 42, 99, 5], [1, 300], [1, 7, 7, 7, 200, 201, 202, 31, 64]]


@pytest.fixture
def target(tiny_config):
    cfg = tiny_config("llama")
    params = init_params(cfg, jax.random.key(0))
    params = {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * 40.0}}
    return Transformer(cfg), params


def test_zero_init_heads_with_copied_lm_head_equal_base_logits(target):
    model, params = target
    heads = init_medusa_heads(model.config, params, num_heads=3)
    logits, hidden, _ = model.apply({"params": params}, np.asarray([PROMPTS[0]]))
    out = MedusaHeads(3, model.config.vocab_size).apply({"params": heads}, hidden)
    for k in range(3):
        np.testing.assert_allclose(out[..., k, :], logits, atol=1e-4, rtol=1e-5)


def test_tree_greedy_equals_plain_greedy(target):
    model, params = target
    cfg = DecodeConfig(max_new_tokens=16, ignore_eos=True)
    plain = generate(model, params, PROMPTS, cfg)
    drafter = Medusa()
    heads = init_medusa_heads(model.config, params, drafter.num_heads)
    res = speculative_generate(model, params, PROMPTS, cfg, drafter=drafter, draft_params=heads)
    assert res.token_ids == plain.token_ids
    np.testing.assert_allclose(np.concatenate(res.logprobs), np.concatenate(plain.logprobs),
                               atol=1e-4)
    assert res.stats["mean_accepted_per_forward"] >= 1.0
    with pytest.raises(CadenzaError, match="greedy"):
        speculative_generate(model, params, PROMPTS, DecodeConfig(method="sample"),
                             drafter=drafter, draft_params=heads)
    with pytest.raises(ValueError, match="no parent"):
        Medusa(paths=((0,), (1, 0)))


def test_medusa_training_learns_a_periodic_sequence(target):
    """Heads trained (base frozen) on a period-5 sequence: the weighted head loss falls."""
    import itertools

    from cadenza.train.medusa_task import train_medusa_heads

    model, params = target
    seq = np.tile(np.asarray([11, 23, 37, 41, 53]), 8)[None, :32].repeat(2, 0)
    heads, losses = train_medusa_heads(model, params, itertools.repeat(seq),
                                       num_heads=Medusa().num_heads, steps=30,
                                       learning_rate=3e-2)
    assert losses[-1] < 0.5 * losses[0]
