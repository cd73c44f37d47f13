"""``cadenza generate --method speculative|ngram|medusa`` on model and head directories."""

import json

import jax
import pytest

from cadenza.cli import main
from cadenza.config import load_config
from cadenza.decode import DecodeConfig, generate
from cadenza.decode.medusa import Medusa, init_medusa_heads, save_medusa_heads
from cadenza.decode.specdec_head import init_accept_head, save_accept_head
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
    medusa = Medusa(paths=((0,), (1,), (0, 0), (0, 1), (0, 0, 0)))
    heads = init_medusa_heads(target[1].model, target[2], medusa.num_heads)
    save_medusa_heads(tmp / "heads", medusa, target[1].model, heads)
    save_medusa_heads(tmp / "other_heads", medusa, other[1].model,
                      init_medusa_heads(other[1].model, other[2], medusa.num_heads))
    accept = init_accept_head(draft[1].model.hidden_size, jax.random.key(3))
    save_accept_head(tmp / "accept", accept, draft[1].model.hidden_size)
    return target, draft, other


def run(capsys, argv):
    for p in PROMPTS:
        argv += ["--prompt-ids", ",".join(map(str, p))]
    assert main(argv) == 0, capsys.readouterr().err
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("method", [["--method", "speculative", "--gamma", "3"],
                                    ["--method", "speculative", "--adaptive", "--accept-head",
                                     "ACCEPT", "--gamma", "5"],
                                    ["--method", "ngram", "--gamma", "4"],
                                    ["--method", "medusa", "--heads", "HEADS"]])
def test_speculative_cli_equals_plain_greedy(dirs, capsys, method):
    (tdir, tconfig, tparams), (ddir, _, _), _ = dirs
    argv = ["generate", "--checkpoint", str(tdir), "--json", "--max-new-tokens", "16",
            "--ignore-eos"] + [str(tdir.parent / e.lower()) if e.isupper() else e
                               for e in method]
    if method[1] == "speculative":
        argv += ["--draft", str(ddir)]
    rows = run(capsys, argv)
    plain = generate(Transformer(tconfig.model), tparams, PROMPTS,
                     DecodeConfig(max_new_tokens=16, ignore_eos=True))
    assert [r["token_ids"] for r in rows] == plain.token_ids
    s = rows[0]["stats"]
    assert s["mean_accepted_per_forward"] >= 1.0 and s["target_forwards"] > 0
    gamma = 3 if method[1] == "medusa" else int(method[-1])     # the tree is 3 deep
    assert len(s["acceptance_per_position"]) == gamma
    assert s["method"] == {"--adaptive": "specdec++"}.get(method[2], method[1])
    assert {"predicted_speedup", "decode_tokens_per_s", "mean_draft_length"} <= set(s)


@pytest.mark.parametrize("extra, message", [
    (["--method", "speculative"], "needs a draft model directory"),
    (["--method", "ngram", "--adaptive"], "--adaptive does not apply to --method ngram"),
    (["--method", "speculative", "--draft", "OTHER"], "(256 tokens) differs from the target"),
    (["--method", "medusa"], "needs a trained Medusa head directory"),
    (["--method", "medusa", "--heads", "OTHER_HEADS"],
     "vocab_size: the head has 256, the target model has 512"),
    (["--method", "speculative", "--draft", "DRAFT", "--adaptive", "--accept-head", "HEADS"],
     "holds a 'medusa' head"),
])
def test_speculative_cli_errors_exit_2(dirs, capsys, extra, message):
    (tdir, _, _), _, (odir, _, _) = dirs
    extra = [str(odir.parent / e.lower()) if e.isupper() else e for e in extra]
    assert main(["generate", "--checkpoint", str(tdir), "--prompt-ids", "1,5"] + extra) == 2
    assert message in capsys.readouterr().err


def test_medusa_cli_sampling_is_seeded(dirs, capsys):
    (tdir, _, _), _, _ = dirs
    argv = ["generate", "--checkpoint", str(tdir), "--json", "--max-new-tokens", "8",
            "--ignore-eos", "--method", "medusa", "--heads", str(tdir.parent / "heads"),
            "--sample", "--temperature", "2.0", "--seed", "7"]
    first, again = run(capsys, list(argv)), run(capsys, list(argv))
    assert [r["token_ids"] for r in first] == [r["token_ids"] for r in again]
    assert all(len(r["token_ids"]) == 8 for r in first)
    assert first[0]["stats"]["method"] == "medusa" and first[0]["stats"]["target_forwards"] > 0


def test_draft_with_another_tokenizer_of_the_same_size_is_refused(dirs, capsys, tmp_path):
    """Same vocabulary size, different tokenizer: refused before compiling, both
    fingerprints named."""
    import shutil

    from cadenza.models.tokenizer import train_tokenizer

    (tdir, _, _), (ddir, _, _), _ = dirs
    target, draft = tmp_path / "target", tmp_path / "draft"
    shutil.copytree(tdir, target)
    shutil.copytree(ddir, draft)
    train_tokenizer(["def f(x): return x + 1"] * 20, 300, target / "tokenizer")
    train_tokenizer(["hello world, once again"] * 20, 300, draft / "tokenizer")
    argv = ["generate", "--checkpoint", str(target), "--prompt-ids", "1,5", "--method",
            "speculative", "--draft", str(draft)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "the draft model's tokenizer (sha256" in err, err
    assert err.count("sha256") == 2
