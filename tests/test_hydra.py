"""Hydra heads: a fresh head reproduces the base logits; tree decoding == plain greedy on ragged
batches (random and trained heads, with a repetition penalty); train -> head directory ->
``cadenza generate --method hydra``; heads for another model are refused."""

import itertools
import json

import jax
import numpy as np
import pytest

from cadenza.cli import main
from cadenza.config import load_config
from cadenza.decode import DecodeConfig, SamplingConfig, generate
from cadenza.decode.hydra import Hydra, hydra_draft_params, load_hydra_heads, save_hydra_heads
from cadenza.decode.medusa import Medusa, init_medusa_heads, save_medusa_heads
from cadenza.decode.speculative import speculative_generate
from cadenza.errors import CadenzaError
from cadenza.models import Transformer, init_params, save_model

PROMPTS = [[1, 17, 42, 99, 5], [1, 300], [1, 7, 7, 7, 200, 201, 202, 31, 64]]
TREE = ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))


def perturbed(params, scale):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * (np.std(x) + 0.05) * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    config = load_config(None, [], preset="tiny")
    params = init_params(config.model, jax.random.key(0))
    params = {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * 40.0}}
    d = save_model(tmp_path_factory.mktemp("hydra") / "target", config, params)
    return Transformer(config.model), params, d


def test_fresh_heads_reproduce_base_and_greedy_equals_plain(target):
    model, params, _ = target
    drafter = Hydra(paths=TREE)
    fresh = drafter.init_heads(model.config, params)
    logits, hidden, _ = model.apply({"params": params}, np.asarray([PROMPTS[0]]))
    tokens = np.asarray([PROMPTS[0]])
    out = drafter.teacher_forced_logits(fresh, hidden, tokens, params)
    for k in range(drafter.num_heads):
        np.testing.assert_allclose(out[..., k, :], logits, atol=1e-4, rtol=1e-5)
    heads = perturbed(fresh, 0.3)     # input projections no longer zero: the path matters
    cfg = DecodeConfig(max_new_tokens=12, ignore_eos=True,
                       sampling=SamplingConfig(repetition_penalty=1.5))
    res = speculative_generate(model, params, PROMPTS, cfg, drafter=drafter,
                               draft_params=hydra_draft_params(heads, params))
    assert res.token_ids == generate(model, params, PROMPTS, cfg).token_ids
    assert res.stats["method"] == "hydra" and res.stats["mean_accepted_per_forward"] >= 1


def test_train_then_decode_from_the_head_directory(target, tmp_path, capsys):
    """Heads trained (base frozen) on a period-5 sequence: the loss falls; the saved heads
    decode through the registry and the CLI exactly like plain greedy."""
    from cadenza.train.hydra_task import train_hydra_heads

    model, params, tdir = target
    seq = np.tile(np.asarray([11, 23, 37, 41, 53]), 8)[None, :24].repeat(2, 0)
    heads, losses = train_hydra_heads(model, params, itertools.repeat(seq), num_heads=3,
                                      steps=12, learning_rate=3e-2)
    assert losses[-1] < 0.7 * losses[0]
    drafter = Hydra(paths=TREE)
    save_hydra_heads(tmp_path / "heads", drafter, model.config, heads)
    cfg = DecodeConfig(max_new_tokens=12, ignore_eos=True)
    plain = generate(model, params, PROMPTS, cfg).token_ids
    via = generate(model, params, PROMPTS, DecodeConfig(
        method="hydra", max_new_tokens=12, ignore_eos=True,
        medusa=DecodeConfig().medusa.__class__(heads=str(tmp_path / "heads"))))
    assert via.token_ids == plain
    argv = ["generate", "--checkpoint", str(tdir), "--json", "--max-new-tokens", "12",
            "--ignore-eos", "--method", "hydra", "--heads", str(tmp_path / "heads")]
    for p in PROMPTS:
        argv += ["--prompt-ids", ",".join(map(str, p))]
    capsys.readouterr()                      # the training log
    assert main(argv) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["token_ids"] for r in rows] == plain
    assert len(rows[0]["stats"]["acceptance_per_position"]) == 3


def test_heads_for_another_model_are_refused(target, tmp_path, capsys):
    model, params, tdir = target
    other = load_config(None, ["model.vocab_size=256"], preset="tiny").model
    oparams = init_params(other, jax.random.key(2))
    drafter = Hydra(paths=TREE)
    save_hydra_heads(tmp_path / "other", drafter, other, drafter.init_heads(other, oparams))
    with pytest.raises(CadenzaError, match="vocab_size: the head has 256, the target model has "
                                           "512"):
        load_hydra_heads(tmp_path / "other", model.config)
    medusa = Medusa(paths=TREE)
    save_medusa_heads(tmp_path / "medusa", medusa, model.config,
                      init_medusa_heads(model.config, params, medusa.num_heads))
    with pytest.raises(CadenzaError, match="holds a 'medusa' head"):
        load_hydra_heads(tmp_path / "medusa", model.config)
    for extra, message in ((["--heads", str(tmp_path / "other")], "vocab_size: the head has"),
                           ([], "needs a trained Hydra head directory")):
        argv = ["generate", "--checkpoint", str(tdir), "--prompt-ids", "1,5", "--method",
                "hydra"] + extra
        assert main(argv) == 2
        assert message in capsys.readouterr().err
