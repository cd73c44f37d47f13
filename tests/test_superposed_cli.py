"""``cadenza generate --method superposed`` on a model directory with a byte-level table."""

import json

import jax
import pytest

from cadenza.cli import main
from cadenza.config import load_config
from cadenza.decode.ngram_table import build_from_files
from cadenza.models import init_params, save_model


@pytest.fixture(scope="module")
def model_and_table(tmp_path_factory):
    root = tmp_path_factory.mktemp("superposed_cli")
    config = load_config(None, ["model.vocab_size=259"], preset="tiny")
    model_dir = save_model(root / "model", config, init_params(config.model, jax.random.key(0)))
    corpus = root / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 20)
    build_from_files([str(corpus)], root / "table")
    return model_dir, root / "table"


def test_superposed_json_gives_k_distinct_drafts(model_and_table, capsys):
    model_dir, table = model_and_table
    rc = main(["generate", "--checkpoint", str(model_dir), "--prompt-ids", "1,103,104,105",
               "--method", "superposed", "--k", "3", "--ngram", str(table),
               "--max-new-tokens", "6", "--json"])
    assert rc == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    drafts = json.loads(line)["drafts"]
    assert len(drafts) == 3
    assert len({tuple(d["token_ids"]) for d in drafts}) == 3
    ppl = [float("inf") if d["perplexity"] is None else d["perplexity"] for d in drafts]
    assert ppl == sorted(ppl)          # JSON has no infinity: an overflowed one prints null


def test_superposed_needs_a_table_unless_alpha_is_zero(model_and_table, capsys):
    model_dir, _ = model_and_table
    args = ["generate", "--checkpoint", str(model_dir), "--prompt-ids", "1,103",
            "--method", "superposed", "--max-new-tokens", "3"]
    assert main(args) == 2
    assert "--ngram" in capsys.readouterr().err
    assert main(args + ["--alpha", "0", "--json"]) == 0
