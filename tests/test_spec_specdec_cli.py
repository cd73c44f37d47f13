"""``cadenza train`` with ``train.task: medusa | specdec`` (configs/experiments/tiny_*.yaml) for
a few steps on a tiny saved model, then ``cadenza generate`` with the head directory it
wrote: greedy output equals plain greedy; a mismatched base fails before training."""

import json

import jax
import pytest

from cadenza.cli import main
from cadenza.config import load_config
from cadenza.decode import DecodeConfig, generate
from cadenza.models import Transformer, init_params, save_model

PROMPTS = [[1, 17, 42, 99, 5], [1, 300], [1, 7, 7, 7, 200, 201, 202, 31, 64]]
SMALL = ["model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=64"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("heads")
    out = {}
    for name, overrides, seed in (("target", [], 0), ("draft", SMALL, 1)):
        config = load_config(None, overrides, preset="tiny")
        params = init_params(config.model, jax.random.key(seed))
        params = {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * 40.0}}
        out[name] = (save_model(tmp / name, config, params), config, params)
    return tmp, out


def train(tmp, experiment, *extra):
    """Run ``cadenza train`` for 3 steps on two stdlib modules; returns the summary."""
    argv = ["train", experiment, f"train.init_from={tmp / 'target'}",
            f"train.output_dir={tmp / experiment}", "train.steps=3", "train.batch_size=8",
            "train.seq_len=32", "train.log_every=1", "train.warmup_steps=1",
            "train.checkpoint_every=0", "train.tensorboard=false", "train.progress_bar=false",
            f"data.data_dir={tmp / 'data'}", "data.stdlib_modules=[bisect.py,colorsys.py]",
            *extra]
    return main(argv)


def generate_ids(capsys, tdir, *method):
    argv = ["generate", "--checkpoint", str(tdir), "--json", "--max-new-tokens", "12",
            "--ignore-eos", *method]
    for p in PROMPTS:
        argv += ["--prompt-ids", ",".join(map(str, p))]
    assert main(argv) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return [r["token_ids"] for r in rows], rows[0]["stats"]


@pytest.mark.parametrize("experiment", ["tiny_medusa", "tiny_specdec"])
def test_train_heads_then_decode_equals_greedy(models, capsys, experiment):
    tmp, m = models
    (tdir, tconfig, tparams), (ddir, _, _) = m["target"], m["draft"]
    extra = ["train.medusa.num_heads=3", "train.medusa.tree=[[0],[1],[0,0],[0,0,0]]"]
    if experiment == "tiny_specdec":
        extra = [f"train.specdec.draft={ddir}"]
    assert train(tmp, experiment, *extra) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n"):])     # after the dataset builder's notes
    assert summary["step"] == 3 and summary["model_dir"] is None
    heads = summary["adapters_dir"]
    assert heads == str(tmp / experiment / "adapters")
    metrics = [json.loads(x) for x in (tmp / experiment / "metrics.jsonl").read_text().split("\n")
               if x]
    assert len(metrics) == 3 and all(r["loss"] > 0 for r in metrics)
    if experiment == "tiny_medusa":
        ids, stats = generate_ids(capsys, tdir, "--method", "medusa", "--heads", heads)
        assert stats["method"] == "medusa" and len(stats["acceptance_per_position"]) == 3
    else:
        ids, stats = generate_ids(capsys, tdir, "--method", "speculative", "--draft", str(ddir),
                                  "--adaptive", "--accept-head", heads, "--gamma", "4")
        assert stats["method"] == "specdec++"
    plain = generate(Transformer(tconfig.model), tparams, PROMPTS,
                     DecodeConfig(max_new_tokens=12, ignore_eos=True))
    assert ids == plain.token_ids


def test_head_task_errors_exit_2(models, capsys):
    tmp, _ = models
    assert main(["train", "tiny_medusa", f"train.init_from={tmp / 'target'}",
                 "train.medusa.num_heads=2", "train.medusa.tree=[[0],[0,0,0]]"]) == 2
    assert "not 1..2 indices" in capsys.readouterr().err
    assert main(["train", "tiny_specdec", f"train.init_from={tmp / 'target'}",
                 "train.specdec.draft=null"]) == 2
    assert "needs the draft model" in capsys.readouterr().err
    assert train(tmp, "tiny_medusa", "model.num_layers=3") == 2
    assert "model.num_layers: " in capsys.readouterr().err
