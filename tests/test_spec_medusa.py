"""Medusa heads: a fresh head reproduces the base logits; tree decoding == plain greedy (also
with a repetition penalty); exact tree sampling follows the target (chi-square); head
directories round-trip and refuse a different target."""

import dataclasses
import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from cadenza.decode import DecodeConfig, SamplingConfig, generate
from cadenza.decode.medusa import (
    Medusa,
    MedusaHeads,
    init_medusa_heads,
    load_medusa_heads,
    save_medusa_heads,
)
from cadenza.decode.speculative import speculative_generate
from cadenza.errors import CadenzaError
from cadenza.models import Transformer, init_params

# the chi-square helpers of the speculative sampling test (test modules are not importable
# by name under --import-mode=importlib)
_path = pathlib.Path(__file__).with_name("test_spec_sampling.py")
_spec = importlib.util.spec_from_file_location("_spec_sampling_helpers", _path)
chi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chi)
chi.N = 2                    # this private copy enumerates the first two tokens (64 cells)
SAMPLES = 8_000

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
    with pytest.raises(ValueError, match="no parent"):
        Medusa(paths=((0,), (1, 0)))
    with pytest.raises(ValueError, match="only 2 heads"):
        Medusa(heads=2)


def test_tree_greedy_with_repetition_penalty_equals_plain_greedy(target):
    model, params = target
    cfg = DecodeConfig(max_new_tokens=12, ignore_eos=True,
                       sampling=SamplingConfig(repetition_penalty=1.5))
    drafter = Medusa(paths=((0,), (1,), (0, 0), (0, 1), (0, 0, 0)))
    heads = chi.perturbed(init_medusa_heads(model.config, params, drafter.num_heads), 0.3)
    res = speculative_generate(model, params, PROMPTS, cfg, drafter=drafter, draft_params=heads)
    assert res.token_ids == generate(model, params, PROMPTS, cfg).token_ids


def test_tree_sampling_matches_target(tiny_config):
    """Sequential elimination on the tree: the first two tokens follow the warped target
    (temperature, top-k and repetition penalty as in the speculative chi-square test)."""
    model, params = chi.toy(tiny_config)
    drafter = Medusa()
    heads = chi.perturbed(init_medusa_heads(model.config, params, drafter.num_heads), 0.3)
    res = speculative_generate(model, params, [chi.PROMPT] * SAMPLES,
                               dataclasses.replace(chi.CFG, max_new_tokens=chi.N), drafter=drafter,
                               draft_params=heads, seeds=list(range(SAMPLES)))
    joint, _ = chi.enumerate_warped(model, params)
    pvalue, impossible = chi.chi_square(np.asarray(res.token_ids), joint)
    assert impossible == 0 and pvalue > 1e-3, pvalue
    assert 0.1 < res.stats["acceptance_per_position"][0] < 1.0


def test_head_directory_round_trip_and_mismatch(target, tmp_path, tiny_config):
    model, params = target
    drafter = Medusa(paths=((0,), (1,), (0, 0)), blocks=2, heads=3)
    heads = init_medusa_heads(model.config, params, 3, blocks=2)
    save_medusa_heads(tmp_path / "h", drafter, model.config, heads)
    back, loaded = load_medusa_heads(tmp_path / "h", model.config)
    assert back == drafter
    for a, b in zip(jax.tree.leaves(heads), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CadenzaError, match="already exists"):
        save_medusa_heads(tmp_path / "h", drafter, model.config, heads)
    other = tiny_config("llama", "model.vocab_size=256")
    with pytest.raises(CadenzaError, match="vocab_size: the head has 512, the target model has "
                                           "256"):
        load_medusa_heads(tmp_path / "h", other)
    with pytest.raises(CadenzaError, match="not a head directory"):
        load_medusa_heads(tmp_path, model.config)


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
