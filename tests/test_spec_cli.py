"""``cadenza generate --method speculative|ngram`` on model directories."""

import json

import jax
import pytest

from cadenza.cli import main
from cadenza.config import load_config
from cadenza.decode import DecodeConfig, generate
from cadenza.models import Transformer, init_params, save_model

PROMPTS = [[1, 17, 42, 99, 5], [1, 300], [1, 7, 7, 7, 200, 201, 202, 31, 64]]
SMALL = ["model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=64"]


def saved(tmp, name, overrides, seed):
    config = load_config(None, overrides, preset="tiny")
    params = init_params(config.model, jax.random.key(seed))
    params = {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * 40.0}}
    return save_model(tmp / name, config, params), config, params


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spec")
    target = saved(tmp, "target", [], 0)
    draft = saved(tmp, "draft", SMALL, 1)
    other = saved(tmp, "other", SMALL + ["model.vocab_size=256"], 2)
    return target, draft, other


def run(capsys, argv):
    for p in PROMPTS:
        argv += ["--prompt-ids", ",".join(map(str, p))]
    assert main(argv) == 0, capsys.readouterr().err
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("method", [["--method", "speculative", "--gamma", "3"],
                                    ["--method", "ngram", "--gamma", "4"]])
def test_speculative_cli_equals_plain_greedy(dirs, capsys, method):
    (tdir, tconfig, tparams), (ddir, _, _), _ = dirs
    argv = ["generate", "--checkpoint", str(tdir), "--json", "--max-new-tokens", "16",
            "--ignore-eos"] + method
    if method[1] == "speculative":
        argv += ["--draft", str(ddir)]
    rows = run(capsys, argv)
    plain = generate(Transformer(tconfig.model), tparams, PROMPTS,
                     DecodeConfig(max_new_tokens=16, ignore_eos=True))
    assert [r["token_ids"] for r in rows] == plain.token_ids
    s = rows[0]["stats"]
    assert s["mean_accepted_per_forward"] >= 1.0 and s["target_forwards"] > 0
    assert len(s["acceptance_per_position"]) == int(method[-1])
    assert {"predicted_speedup", "decode_tokens_per_s", "mean_draft_length"} <= set(s)


@pytest.mark.parametrize("extra, message", [
    (["--method", "speculative"], "needs a draft model directory"),
    (["--method", "ngram", "--adaptive"], "needs speculative=draft"),
    (["--method", "speculative", "--draft", "OTHER"], "(256 tokens) differs from the target"),
])
def test_speculative_cli_errors_exit_2(dirs, capsys, extra, message):
    (tdir, _, _), _, (odir, _, _) = dirs
    extra = [str(odir) if e == "OTHER" else e for e in extra]
    assert main(["generate", "--checkpoint", str(tdir), "--prompt-ids", "1,5"] + extra) == 2
    assert message in capsys.readouterr().err
