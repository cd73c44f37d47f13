"""PEFT through ``cadenza.train.fit``: a base from ``train.init_from``, adapters trained,
the base untouched, adapters and the merged model written."""

import json

import jax
import numpy as np
import pytest

from cadenza.config import load_config
from cadenza.errors import ConfigError
from cadenza.models import init_params, load_model, save_model
from cadenza.train import fit
from cadenza.train.synthetic import SyntheticBatches


def _config(tmp_path, base_dir, method, *extra):
    return load_config(None, [
        f"train.output_dir={tmp_path / method}", "train.steps=6", "train.batch_size=4",
        "train.seq_len=32", "train.learning_rate=1e-2", "train.warmup_steps=0",
        "train.log_every=1", "train.progress_bar=false", "train.tensorboard=false",
        f"train.init_from={base_dir}", f"peft.method={method}", "mesh.data=1", *extra],
        preset="tiny")


def _data(config):
    return SyntheticBatches(config.train.batch_size, config.train.seq_len,
                            config.model.vocab_size, seed=0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    config = load_config(None, [], preset="tiny")
    return save_model(tmp_path_factory.mktemp("base") / "model", config,
                      init_params(config.model, jax.random.key(0)))


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_fit_trains_adapters_on_a_frozen_base(tmp_path, base_dir, method):
    extra = (["peft.targets=.*attn\\.(q|v)_proj"] if method == "lora"   # soft prompts
             else ["peft.num_virtual_tokens=4", "train.learning_rate=0.3"])   # need a high LR
    config = _config(tmp_path, base_dir, method, *extra)
    data = _data(config)
    summary = fit(config, data=data, devices=jax.devices()[:1])
    assert summary["adapters_dir"] is not None
    with open(tmp_path / method / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert losses[-1] < losses[0]
    if method == "lora":
        _, merged = load_model(summary["model_dir"])
        _, base = load_model(base_dir)
        q = merged["layers"]["attn"]["q_proj"]["kernel"]
        k = merged["layers"]["attn"]["k_proj"]["kernel"]
        assert not np.allclose(q, base["layers"]["attn"]["q_proj"]["kernel"])
        np.testing.assert_array_equal(k, base["layers"]["attn"]["k_proj"]["kernel"])
    else:
        assert summary["model_dir"] is None  # a soft prompt does not fold into weights


def test_peft_without_a_base_fails_before_compiling(tmp_path):
    config = load_config(None, [f"train.output_dir={tmp_path}", "peft.method=lora",
                                "mesh.data=1"], preset="tiny")
    with pytest.raises(ConfigError, match="train.init_from"):
        fit(config, data=_data(config), devices=jax.devices()[:1])


def test_init_from_a_different_model_fails_clearly(tmp_path, base_dir):
    config = _config(tmp_path, base_dir, "lora", "model.num_layers=3")
    with pytest.raises(Exception, match="different model"):
        fit(config, data=_data(config), devices=jax.devices()[:1])
