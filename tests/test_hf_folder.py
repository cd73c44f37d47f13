"""Hugging Face folders are model directories everywhere (converted in memory), a missing
path has its own error, and a tokenizer is only needed for text."""

import json

import jax
import numpy as np
import pytest

from cadenza.cli import main
from cadenza.config import ExperimentConfig
from cadenza.errors import CadenzaError
from cadenza.models import init_params, load_hf, load_model, save_hf, save_model
from cadenza.models.checkpoint import tokenizer_dir


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from cadenza.config import load_config

    config = load_config(None, [], preset="tiny").model
    root = tmp_path_factory.mktemp("hf_folder")
    return save_hf((config, init_params(config, jax.random.key(0))), root / "hf")


def test_hf_folder_loads_like_hf_import(hf_dir):
    experiment, params = load_model(hf_dir)
    config, reference = load_hf(hf_dir)
    assert experiment.model == config and experiment.name == "hf"
    jax.tree.map(np.testing.assert_array_equal, params, reference)
    assert tokenizer_dir(hf_dir) is None  # no tokenizer files in it


def test_missing_and_wrong_directories_have_distinct_errors(tmp_path):
    with pytest.raises(CadenzaError, match="no such model directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(CadenzaError, match="not a cadenza model directory.*Hugging Face"):
        load_model(tmp_path)


def test_generate_from_a_hf_folder_with_ids_and_text_needs_a_tokenizer(hf_dir, capsys):
    assert main(["generate", "--checkpoint", str(hf_dir), "--prompt-ids", "1,2,3",
                 "--max-new-tokens", "3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(row["token_ids"]) == 3
    assert {"import_s", "load_s", "compile_s", "prefill_s", "decode_s"} <= set(row["stats"])
    assert main(["generate", "--checkpoint", str(hf_dir), "--prompt", "hi"]) == 2
    assert "text prompts need a tokenizer" in capsys.readouterr().err


def test_token_ids_need_no_loadable_tokenizer(hf_dir, tmp_path, capsys):
    """hf-import of a folder without tokenizer files leaves tokenizer/ with only
    generation_config.json: token ids still decode."""
    experiment, params = load_model(hf_dir)
    only_generation = tmp_path / "gen"
    only_generation.mkdir()
    (only_generation / "generation_config.json").write_text("{}")
    save_model(tmp_path / "model", ExperimentConfig(model=experiment.model), params,
               tokenizer_dir=only_generation)
    assert main(["generate", "--checkpoint", str(tmp_path / "model"), "--prompt-ids", "4,5,6",
                 "--max-new-tokens", "3", "--json"]) == 0  # same shapes: compiled once
    assert len(json.loads(capsys.readouterr().out.splitlines()[0])["token_ids"]) == 3
    assert main(["generate", "--checkpoint", str(tmp_path / "model"), "--prompt", "x"]) == 2
    assert "its tokenizer does not load" in capsys.readouterr().err



def test_cli_prints_no_libtpu_lines_on_a_machine_without_tpus(hf_dir, cli_env, libtpu_noise):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "cadenza", "generate", "--checkpoint", str(hf_dir),
                        "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--json"],
                       capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr
    assert not libtpu_noise(r.stderr), r.stderr
