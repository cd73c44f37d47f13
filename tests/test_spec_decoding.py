"""Speculative decoding (draft model, prompt lookup, adaptive length): greedy output equals
plain greedy on ragged batches, bookkeeping stats, bad input."""

import dataclasses

import jax
import numpy as np
import pytest

from cadenza.decode import DecodeConfig, generate
from cadenza.decode.prompt_lookup import PromptLookup
from cadenza.decode.specdec_head import StopRule, init_accept_head
from cadenza.decode.speculative import DraftModel, speculative_generate
from cadenza.errors import CadenzaError
from cadenza.models import Transformer, init_params

PROMPTS = [[1, 17, 42, 99, 5], [1, 300], [1, 7, 7, 7, 200, 201, 202, 31, 64]]
CFG = DecodeConfig(max_new_tokens=16, ignore_eos=True)
SMALL = ("model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=64")
_REF = {}
_MODELS = {}


def sharpen(params, scale=40.0):
    """Scale the LM head so random-model logits have clear winners (no near-ties)."""
    return {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * scale}}


def cached_model(tiny_config, family, seed, *overrides):
    key = (family, seed, overrides)
    if key not in _MODELS:
        cfg = tiny_config(family, *overrides)
        _MODELS[key] = Transformer(cfg), sharpen(init_params(cfg, jax.random.key(seed)))
    return _MODELS[key]


@pytest.fixture
def target(tiny_config):
    return cached_model(tiny_config, "llama", 0)


@pytest.fixture
def reference(target):
    if "greedy" not in _REF:
        _REF["greedy"] = generate(*target, PROMPTS, CFG)
    return _REF["greedy"]


def small_draft(tiny_config):
    model, params = cached_model(tiny_config, "llama", 1, *SMALL)
    return model, params


def near_copy(params, scale=0.3, seed=5):
    """Target params plus noise: a same-shaped draft that agrees often but not always."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.numpy.std(x) * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("gamma", [1, 3])
def test_small_draft_greedy_equals_plain_greedy(tiny_config, target, reference, gamma):
    draft, dparams = small_draft(tiny_config)
    res = speculative_generate(*target, PROMPTS, CFG, drafter=DraftModel(draft.config, gamma),
                               draft_params=(dparams, None))
    assert res.token_ids == reference.token_ids
    np.testing.assert_allclose(np.concatenate(res.logprobs), np.concatenate(reference.logprobs),
                               atol=1e-4)
    s = res.stats
    assert s["gamma"] == gamma and len(s["acceptance_per_position"]) == gamma
    assert s["generated_tokens"] == 3 * 16 and s["decode_tokens_per_s"] > 0
    # every row-round emits accepted drafts + 1 (until the last, which may be cut)
    assert s["target_forwards"] <= 3 * 15
    assert 1.0 <= s["mean_accepted_per_forward"] <= gamma + 1


def test_gamma8_near_copy_and_identical_draft(target, reference):
    model, params = target
    drafter = DraftModel(model.config, 8)
    near = speculative_generate(model, params, PROMPTS, CFG, drafter=drafter,
                                draft_params=(near_copy(params), None))
    assert near.token_ids == reference.token_ids
    same = speculative_generate(model, params, PROMPTS, CFG, drafter=drafter,
                                draft_params=(params, None))
    assert same.token_ids == reference.token_ids
    # draft == target: everything proposed is accepted; 9 tokens per forward until the end
    assert same.stats["acceptance_per_position"] == [1.0] * 8
    assert same.stats["target_forwards"] == 3 * 2      # 15 tokens after prefill: 9 + 6
    assert near.stats["mean_accepted_per_forward"] < same.stats["mean_accepted_per_forward"]


def test_prompt_lookup_greedy_equals_plain_and_accepts_repeats(target, reference):
    model, params = target
    res = speculative_generate(model, params, PROMPTS, CFG, drafter=PromptLookup(gamma=4))
    assert res.token_ids == reference.token_ids
    # the random target's greedy output falls into loops, which lookup drafts recover
    assert res.stats["mean_accepted_per_forward"] > 1.0
    assert res.stats["predicted_speedup"] == res.stats["mean_accepted_per_forward"]


def test_stop_token_cuts_rows_like_plain_greedy(tiny_config, target, reference):
    model, params = target
    stop = reference.token_ids[1][5]       # appears mid-row in row 1
    cfg = DecodeConfig(max_new_tokens=16, ignore_eos=True, stop_token_ids=[stop])
    plain = generate(model, params, PROMPTS, cfg)
    res = speculative_generate(model, params, PROMPTS, cfg, drafter=PromptLookup(gamma=4))
    assert res.token_ids == plain.token_ids and res.finish_reasons == plain.finish_reasons
    assert "stop_token" in res.finish_reasons


def test_specdec_head_stubbed_gives_max_or_min_length(target, reference):
    model, params = target
    head = init_accept_head(model.config.hidden_size, jax.random.key(0))
    out = head["out"]
    always = {**head, "out": {"kernel": 0 * out["kernel"], "bias": np.array([-50.0, 50.0])}}
    never = {**head, "out": {"kernel": 0 * out["kernel"], "bias": np.array([50.0, -50.0])}}
    drafter = DraftModel(model.config, 20, stop=StopRule("head"), name="specdec++")
    near = near_copy(params, 0.1)
    a1 = speculative_generate(model, params, PROMPTS, CFG, drafter=drafter,
                              draft_params=(near, always))
    a0 = speculative_generate(model, params, PROMPTS, CFG, drafter=drafter,
                              draft_params=(near, never))
    assert a1.token_ids == reference.token_ids == a0.token_ids
    assert a1.stats["mean_draft_length"] == 20.0
    assert a0.stats["mean_draft_length"] == 2.0


def test_confidence_rule_adapts_length_and_stays_exact(target, reference):
    model, params = target
    drafter = DraftModel(model.config, 6, stop=StopRule("confidence", threshold=0.3))
    res = speculative_generate(model, params, PROMPTS, CFG, drafter=drafter,
                               draft_params=(near_copy(params), None))
    assert res.token_ids == reference.token_ids
    assert 2.0 <= res.stats["mean_draft_length"] <= 6.0


def test_draft_with_other_vocab_fails_before_compiling(tiny_config, target):
    cfg = tiny_config("llama", "model.vocab_size=256", *SMALL)
    # raised before the params are even looked at (so before compiling anything)
    with pytest.raises(CadenzaError, match=r"\(256 tokens\).*\(512 tokens\)"):
        speculative_generate(*target, PROMPTS, CFG, drafter=DraftModel(cfg, 3),
                             draft_params=(None, None))




def test_generate_decodes_a_scanned_draft_unrolled_with_plain_greedy_output(
        tiny_config, target, reference):
    """On CPU the registry path runs the draft in the unrolled layout (no per-step copy of
    its stacked layer weights), with the same tokens as plain greedy."""
    draft, dparams = small_draft(tiny_config)
    drafter, (unrolled, _) = DraftModel(draft.config, 3).decode_layout((dparams, None))
    assert draft.config.scan_layers and not drafter.config.scan_layers
    assert "layers" not in unrolled and "layer_0" in unrolled
    res = generate(*target, PROMPTS, dataclasses.replace(CFG, method="speculative"),
                   drafter=DraftModel(draft.config, 3), draft_params=(dparams, None))
    assert res.token_ids == reference.token_ids
