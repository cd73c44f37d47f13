"""Bad inputs are one clear error (exit 2, no traceback) and nothing is written or lost:
merge-lora into the wrong model, duplicate YAML keys, output paths that exist, files that
are not what they claim to be."""

import dataclasses
import hashlib

import jax
import pytest

from cadenza.cli import main
from cadenza.config import load_config
from cadenza.models import init_params, save_model
from cadenza.outputs import MARKER
from cadenza.train import peft
from cadenza.train.peft.artifacts import save_adapters


def _hashes(d):
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _error(capsys, argv, *fragments):
    """Run the CLI: exit 2 with one ``error:`` line holding every fragment."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, err
    return err


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    """A tiny base, a LoRA adapter recorded as trained on it, a copy of the base and a model
    of another architecture (vocab 256, MLP 128)."""
    root = tmp_path_factory.mktemp("merge")
    cfg = load_config(None, ["peft.method=lora", "peft.rank=4",
                             f"train.init_from={root / 'base'}"], preset="tiny")
    base_cfg = dataclasses.replace(cfg, peft=type(cfg.peft)())
    params = init_params(cfg.model, jax.random.key(0))
    save_model(root / "base", base_cfg, params)
    save_model(root / "copy", base_cfg, params)
    _, trainable, _ = peft.prepare(cfg, params, jax.random.key(1))
    save_adapters(root / "ad", cfg, trainable)
    other = load_config(None, ["model.vocab_size=256", "model.intermediate_size=128"],
                        preset="tiny")
    save_model(root / "other", other, init_params(other.model, jax.random.key(2)))
    return root


def test_merge_lora_refuses_another_architecture_and_another_base(lora_dirs, capsys):
    root = lora_dirs
    _error(capsys, ["convert", "merge-lora", "--model", str(root / "other"), "--adapter",
                    str(root / "ad"), "--out", str(root / "m1")],
           "another model architecture", "model.vocab_size: adapters have 512, --model has 256",
           "model.intermediate_size")
    _error(capsys, ["convert", "merge-lora", "--model", str(root / "copy"), "--adapter",
                    str(root / "ad"), "--out", str(root / "m2")],
           f"trained on the base {root / 'base'}", "--allow-other-base")
    assert not (root / "m1").exists() and not (root / "m2").exists()
    assert main(["convert", "merge-lora", "--model", str(root / "copy"), "--adapter",
                 str(root / "ad"), "--out", str(root / "m3"), "--allow-other-base"]) == 0
    assert (root / "m3" / MARKER).is_file()
    # an existing output is never overwritten
    before = _hashes(root / "m3")
    _error(capsys, ["convert", "merge-lora", "--model", str(root / "base"), "--adapter",
                    str(root / "ad"), "--out", str(root / "m3")], "already exists")
    assert _hashes(root / "m3") == before
