"""Layer-skip self-speculation: greedy output equals plain greedy on ragged batches; with no
layer skipped every draft is accepted; exact sampling follows the target (chi-square); the
skip-set search and the CLI; bad skip sets are refused with the field named."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from cadenza.cli import main
from cadenza.config import load_config
from cadenza.decode import DecodeConfig, generate
from cadenza.decode.config import LayerSkipConfig, SpeculativeConfig
from cadenza.decode.layer_skip import LayerSkip, search_skip_set, skip_params
from cadenza.decode.specdec_head import StopRule
from cadenza.decode.speculative import speculative_generate
from cadenza.errors import CadenzaError
from cadenza.models import Transformer, init_params, save_model

SAMPLES = 8_000

PROMPTS = [[1, 17, 42, 99, 5], [1, 300], [1, 7, 7, 7, 200, 201, 202, 31, 64]]
CFG = DecodeConfig(max_new_tokens=13, ignore_eos=True)


def sharp(cfg, seed=0, scale=40.0):
    """A random model whose logits have clear winners (an untied LM head scaled up)."""
    params = init_params(cfg, jax.random.key(seed))
    if "lm_head" in params:
        params = {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * scale}}
    return Transformer(cfg), params


_MODELS = {}


@pytest.fixture
def target(tiny_config):
    if "target" not in _MODELS:
        _MODELS["target"] = sharp(tiny_config("llama", "model.num_layers=3"))
    return _MODELS["target"]


def reference(target):
    if "greedy" not in _MODELS:
        _MODELS["greedy"] = generate(*target, PROMPTS, CFG)
    return _MODELS["greedy"]


def test_greedy_equals_plain_greedy_on_ragged_rows(target):
    model, params = target
    plain = reference(target)
    drafter = LayerSkip(gamma=3, stop=StopRule("confidence", 0.5, 1))
    res = speculative_generate(model, params, PROMPTS, CFG, drafter=drafter,
                               draft_params=skip_params(model.config, params, (1,)))
    assert res.token_ids == plain.token_ids
    np.testing.assert_allclose(np.concatenate(res.logprobs), np.concatenate(plain.logprobs),
                               atol=1e-4)
    s = res.stats
    assert s["method"] == "layer_skip" and s["gamma"] == 3
    assert 0 < s["cost_ratio"] < 1 and s["mean_accepted_per_forward"] >= 1.0


def test_no_skipped_layer_accepts_every_draft(target):
    """The draft is then the target itself: each round of gamma = 3 drafts is accepted whole
    (12 tokens after the first = 3 rounds of 4 per row)."""
    model, params = target
    res = speculative_generate(model, params, PROMPTS, CFG, drafter=LayerSkip(gamma=3),
                               draft_params=skip_params(model.config, params, ()))
    assert res.token_ids == reference(target).token_ids
    assert res.stats["acceptance_per_position"] == [1.0, 1.0, 1.0]
    assert res.stats["target_forwards"] == 3 * len(PROMPTS)
    assert res.stats["mean_accepted_per_forward"] == 4.0


def test_exact_sampling_matches_target(tiny_config, chi2):
    """The residual rule with the skipped-layer draft's q: the first two tokens follow the
    warped target (temperature, top-k, repetition penalty)."""
    cfg = tiny_config("llama", f"model.vocab_size={chi2.V}", "model.num_layers=2")
    model, params = sharp(cfg, scale=3.0)
    res = speculative_generate(model, params, [chi2.PROMPT] * SAMPLES,
                               dataclasses.replace(chi2.CFG, max_new_tokens=chi2.N),
                               drafter=LayerSkip(gamma=2), seeds=list(range(SAMPLES)),
                               draft_params=skip_params(model.config, params, (0,)))
    joint, _ = chi2.enumerate_warped(model, params)
    pvalue, impossible = chi2.chi_square(np.asarray(res.token_ids), joint)
    assert impossible == 0 and pvalue > 1e-3, pvalue
    assert 0.0 < res.stats["acceptance_per_position"][0] < 1.0


def test_search_picks_the_best_set_of_its_size(target):
    model, params = target
    cfg = dataclasses.replace(CFG, max_new_tokens=8, method="layer_skip",
                              speculative=SpeculativeConfig(gamma=2))
    skip, trials = search_skip_set(model, params, PROMPTS[:2], cfg, 2)
    assert [t["skip"] for t in trials[:3]] == [[0], [1], [2]] and len(trials) == 5
    best = max(trials[:3], key=lambda t: t["accepted_per_forward"])["skip"]   # ties: lowest
    assert all(set(best) < set(t["skip"]) for t in trials[3:])
    assert list(skip) == max(trials[3:], key=lambda t: t["accepted_per_forward"])["skip"]
    with pytest.raises(CadenzaError, match="--search-skip"):
        search_skip_set(model, params, PROMPTS, cfg, 3)


def test_bad_skip_sets_are_refused_with_the_field_named(target):
    model, params = target
    for skip, message in [([0, 1, 2], "skips every layer"), ([3], "layer 3 does not exist")]:
        cfg = dataclasses.replace(CFG, method="layer_skip",
                                  layer_skip=LayerSkipConfig(skip_layers=skip))
        with pytest.raises(CadenzaError, match=message) as e:
            generate(model, params, PROMPTS, cfg)
        assert "decode.layer_skip.skip_layers" in str(e.value)
    with pytest.raises(CadenzaError, match="decode.layer_skip.skip_layers"):
        LayerSkipConfig(skip_layers=[1, 1])
    with pytest.raises(CadenzaError, match="draft params from skip_params"):
        speculative_generate(model, params, PROMPTS, CFG, drafter=LayerSkip(), draft_params=params)


def test_alternating_windows_keep_each_kept_layer_s_own(tiny_config):
    """Gemma 2 alternates local and global layers: a skip set is taken only when every kept
    layer keeps its attention window in the smaller draft."""
    cfg = tiny_config("gemma2", "model.num_layers=3")          # windows: local, global, local
    params = init_params(cfg, jax.random.key(0))
    assert skip_params(cfg, params, (2,)).kept.tolist() == [0, 1]
    with pytest.raises(CadenzaError, match="alternates local and global") as e:
        skip_params(cfg, params, (1,))
    assert "decode.layer_skip.skip_layers" in str(e.value)


def test_cli_search_then_decode_and_errors(tmp_path, capsys):
    config = load_config(None, ["model.num_layers=2"], preset="tiny")
    model, params = sharp(config.model)
    d = save_model(tmp_path / "m", config, params)
    argv = ["generate", "--checkpoint", str(d), "--json", "--max-new-tokens", "6",
            "--ignore-eos", "--method", "layer_skip", "--gamma", "2", "--prompt-ids", "1,17,42",
            "--prompt-ids", "1,300"]
    assert main(argv + ["--search-skip", "1"]) == 0
    out = capsys.readouterr()
    assert "best: --skip-layers" in out.err and out.err.count("tokens per target forward") == 2
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [len(r["token_ids"]) for r in rows] == [6, 6]        # greedy identity: tests above
    assert rows[0]["stats"]["method"] == "layer_skip"
    assert main(argv + ["--skip-layers", "0,1"]) == 2
    assert "decode.layer_skip.skip_layers" in capsys.readouterr().err
    assert main(argv + ["--search-skip", "2"]) == 2
    assert "--search-skip" in capsys.readouterr().err
    recycle = ["generate", "--checkpoint", str(d), "--prompt-ids", "1,5", "--method",
               "recycling", "--max-new-tokens", "2"]             # the default tree: 3 deep
    assert main(recycle) == 2
    assert "decode.recycling.depth" in capsys.readouterr().err
