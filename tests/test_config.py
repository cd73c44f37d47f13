"""Config loading: presets, experiment files, overrides and every error path."""

import dataclasses

import pytest

import cadenza
from cadenza.config import ExperimentConfig, load_config, preset_names, to_yaml
from cadenza.errors import ConfigError

PRESETS = ["tiny", "llama-3.2-1b", "llama-3.1-8b", "qwen2.5-0.5b", "qwen2.5-7b", "mistral-7b",
           "gemma-2-2b", "qwen3-0.6b", "qwen3-8b", "gemma-3-1b", "gemma-3-12b", "mixtral-8x7b",
           "qwen3-30b-a3b"]

# Published parameter counts (billions), to check the presets' shapes are real (Gemma 3:
# the text decoder, embedding + non-embedding params of the Gemma 3 report's table).
PUBLISHED_B = {"llama-3.2-1b": 1.24, "llama-3.1-8b": 8.03, "qwen2.5-0.5b": 0.49,
               "qwen2.5-7b": 7.62, "mistral-7b": 7.24, "gemma-2-2b": 2.61, "qwen3-0.6b": 0.596,
               "qwen3-8b": 8.19, "gemma-3-1b": 1.0, "gemma-3-12b": 11.77,
               "mixtral-8x7b": 46.7, "qwen3-30b-a3b": 30.5}
# Published active parameters per token of the MoE presets (billions).
PUBLISHED_ACTIVE_B = {"mixtral-8x7b": 12.9, "qwen3-30b-a3b": 3.3}


def test_presets_exist_and_have_real_shapes():
    assert set(PRESETS) <= set(preset_names())
    for name, billions in PUBLISHED_B.items():
        model = load_config(None, preset=name).model
        assert model.preset == name
        assert model.num_params() / 1e9 == pytest.approx(billions, rel=0.01), name
        active = PUBLISHED_ACTIVE_B.get(name, billions)
        assert model.num_active_params() / 1e9 == pytest.approx(active, rel=0.02), name


def test_family_switches_follow_the_family_and_contradictions_are_refused():
    gemma = load_config(None, ["model.family=gemma", "model.num_kv_heads=1"], preset="tiny")
    assert gemma.model.norm_plus_one and gemma.model.scale_embeddings
    assert not gemma.model.post_norms and gemma.model.qk_norm == "none"
    qwen2_moe = load_config(None, ["model.family=qwen2_moe", "model.num_experts=4",
                                   "model.num_experts_per_tok=2"], preset="tiny")
    assert qwen2_moe.model.qkv_bias  # not fixed by the family: transformers' default
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.family=qwen3", "model.qk_norm=none"], preset="tiny")
    assert e.value.where == "model.qk_norm" and "'qwen3'" in e.value.what
    with pytest.raises(ConfigError, match="norm_plus_one"):
        load_config(None, ["model.family=llama"], preset="gemma-3-1b")


def test_experiment_file_with_preset_and_overrides(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("name: mine\nmodel:\n  preset: qwen2.5-0.5b\n  num_layers: 3\n"
                 "train:\n  steps: 7\n")
    cfg = load_config(f, ["train.steps=9", "model.dtype=float32"])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name == "mine" and cfg.train.steps == 9
    assert cfg.model.num_layers == 3 and cfg.model.qkv_bias and cfg.model.dtype == "float32"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 1  # type: ignore[misc]


def test_shipped_experiment_by_name_and_override_of_preset():
    cfg = load_config("tiny_pretrain", ["model.preset=gemma-2-2b"])
    assert cfg.model.family == "gemma2" and cfg.model.attn_logit_softcap == 50.0


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("tiny_pretrain", ["train.steps=3"])
    f = tmp_path / "resolved.yaml"
    f.write_text(to_yaml(cfg))
    assert load_config(f) == cfg


def test_public_entry_point():
    assert cadenza.load_config is load_config


@pytest.mark.parametrize("overrides, where, hint", [
    (["model.hiden_size=3"], "model.hiden_size", "Did you mean 'hidden_size'?"),
    (["trian.steps=3"], "trian", "Did you mean 'train'?"),
    (["model.rope_scaling.fctor=2"], "model.rope_scaling.fctor", "Did you mean 'factor'?"),
    (["train.steps=abc"], "train.steps", "type int"),
    (["model.qkv_bias=maybe"], "model.qkv_bias", "type bool"),
    (["train.steps=0"], "train.steps", "1 <= steps"),
    (["decode.sampling.top_p=1.5"], "decode.sampling.top_p", "top_p <= 1.0"),
    (["decode.sampling.top_p=0"], "decode.sampling.top_p", "0.0 < top_p"),
    (["model.family=llamma"], "model.family", "'llama'"),
    (["model.preset=tinyy"], "model.preset", "Did you mean 'tiny'?"),
    (["model.num_heads=4", "model.num_kv_heads=3"], "model.num_kv_heads", "divisor"),
    (["model.local_layers=all"], "model.sliding_window", "sliding_window"),
    (["model.eos_token_id=600"], "model.eos_token_id", "eos_token_id <= 511"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "mesh", "at most one"),
    (["mesh.logical_axis_rules.batch=[dta]"], "mesh.logical_axis_rules.batch", "mesh axes"),
    (["train.batch_size=6", "train.microbatches=4"], "train.microbatches", "dividing"),
    (["steps"], "overrides", "section.field=value"),
])
def test_config_errors_name_field_value_and_fix(overrides, where, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, preset="tiny")
    assert where in str(e.value) and hint in str(e.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"stepz.*bad.yaml.*Did you mean 'steps'"):
        load_config(f)


def test_bad_yaml_and_missing_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found.*tiny_pretrain"):
        load_config(tmp_path / "nope.yaml")
