"""Token Recycling: greedy output equals plain greedy on ragged batches; a matrix seeded from
the ground truth accepts the whole tree depth; exact sampling follows the target (chi-square);
bad settings are refused with the field named."""

import dataclasses

import jax
import numpy as np
import pytest

from cadenza.decode import DecodeConfig, SamplingConfig, generate
from cadenza.decode.config import RecyclingConfig
from cadenza.decode.speculative import speculative_generate
from cadenza.decode.token_recycling import TokenRecycling, recycling_tree
from cadenza.errors import CadenzaError
from cadenza.models import Transformer, init_params

SAMPLES = 8_000

PROMPTS = [[1, 17, 42, 99, 5], [1, 300], [1, 7, 7, 7, 200, 201, 202, 31, 64]]
CFG = DecodeConfig(max_new_tokens=16, ignore_eos=True)


@pytest.fixture
def target(tiny_config):
    cfg = tiny_config("llama")
    params = init_params(cfg, jax.random.key(0))
    return Transformer(cfg), {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * 40.0}}


def test_tree_is_breadth_first_and_closed():
    paths = recycling_tree(15, 4, 8)
    assert len(paths) == 15 and max(map(len, paths)) == 4
    assert all(p[:-1] in paths for p in paths if len(p) > 1)
    assert list(paths) == sorted(paths, key=lambda p: (len(p), p))
    assert recycling_tree(4, 4, 1) == ((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0))   # a chain
    d = TokenRecycling(k=8, nodes=15, depth=4)
    assert len(d.parents) == 15 and d.parents[:4] == (-1, -1, -1, -1)


def test_greedy_equals_plain_greedy_on_ragged_rows(target):
    model, params = target
    plain = generate(model, params, PROMPTS, CFG)
    res = speculative_generate(model, params, PROMPTS, CFG, drafter=TokenRecycling())
    assert res.token_ids == plain.token_ids
    np.testing.assert_allclose(np.concatenate(res.logprobs), np.concatenate(plain.logprobs),
                               atol=1e-4)
    assert res.stats["method"] == "recycling" and res.stats["gamma"] == 3
    assert res.stats["mean_accepted_per_forward"] >= 1.0


def test_registry_method_with_repetition_penalty_equals_plain_greedy(target):
    model, params = target
    cfg = dataclasses.replace(CFG, max_new_tokens=10,
                              sampling=SamplingConfig(repetition_penalty=1.5))
    res = generate(model, params, PROMPTS, dataclasses.replace(
        cfg, method="recycling", recycling=RecyclingConfig(k=4, nodes=6, depth=3)))
    assert res.token_ids == generate(model, params, PROMPTS, cfg).token_ids
    assert res.stats["gamma"] == 3


def test_matrix_seeded_from_the_ground_truth_accepts_the_whole_depth(target):
    """One round (max_new_tokens = depth + 2): each row's matrix holds its greedy continuation
    in column 0, so the rank-0 chain is accepted to the bottom of the tree."""
    model, params = target
    drafter = TokenRecycling(k=8, nodes=15, depth=4)
    prompts = [PROMPTS[0], PROMPTS[2]]     # PROMPTS[1]'s continuation repeats a token with
    cfg = dataclasses.replace(CFG, max_new_tokens=drafter.depth + 2)   # two successors
    plain = generate(model, params, prompts, cfg)
    v = model.config.vocab_size
    matrix = np.zeros((len(prompts), v, drafter.k), np.int32)
    for b, out in enumerate(plain.token_ids):
        assert len(set(out[:drafter.depth])) == drafter.depth        # no conflicting repeats
        for a, c in zip(out[:drafter.depth], out[1:]):
            matrix[b, a, 0] = c
    res = speculative_generate(model, params, prompts, cfg, drafter=drafter, draft_params=matrix)
    assert res.token_ids == plain.token_ids
    assert res.stats["acceptance_per_position"] == [1.0] * drafter.depth
    assert res.stats["target_forwards"] == len(prompts)
    assert res.stats["mean_accepted_per_forward"] == drafter.depth + 1


def test_exact_sampling_matches_target(tiny_config, chi2):
    """Sequential elimination on the recycled tree: the first two tokens follow the warped
    target (temperature, top-k, repetition penalty)."""
    model, params = chi2.toy(tiny_config)
    res = speculative_generate(model, params, [chi2.PROMPT] * SAMPLES,
                               dataclasses.replace(chi2.CFG, max_new_tokens=chi2.N),
                               drafter=TokenRecycling(k=3, nodes=5, depth=2),
                               seeds=list(range(SAMPLES)))
    joint, _ = chi2.enumerate_warped(model, params)
    pvalue, impossible = chi2.chi_square(np.asarray(res.token_ids), joint)
    assert impossible == 0 and pvalue > 1e-3, pvalue
    assert 0.0 < res.stats["acceptance_per_position"][0] < 1.0


def test_bad_settings_are_refused_with_the_field_named(target):
    model, params = target
    with pytest.raises(CadenzaError, match="decode.recycling.depth") as e:
        speculative_generate(model, params, PROMPTS, dataclasses.replace(CFG, max_new_tokens=3),
                             drafter=TokenRecycling(nodes=15, depth=4))
    assert "4 tokens deep" in str(e.value) and "max_new_tokens is 3" in str(e.value)
    with pytest.raises(CadenzaError, match="decode.recycling.k"):
        speculative_generate(model, params, PROMPTS, CFG, drafter=TokenRecycling(k=600))
    with pytest.raises(CadenzaError, match="warm-start matrix has shape"):
        speculative_generate(model, params, PROMPTS, CFG, drafter=TokenRecycling(k=8),
                             draft_params=np.zeros((512, 4), np.int32))
    with pytest.raises(CadenzaError, match="decode.recycling.depth"):
        RecyclingConfig(nodes=3, depth=5)
    with pytest.raises(CadenzaError, match="decode.recycling.k"):
        RecyclingConfig(k=0)
