"""Model directories: save, load, sharded restore, and clear errors."""

import jax
import numpy as np
import pytest

from cadenza.config import load_config
from cadenza.errors import CadenzaError
from cadenza.models import init_params, load_model, save_model, unstack_layers
from cadenza.train.config import MeshConfig
from cadenza.train.mesh import make_mesh


def test_save_then_load_round_trips_and_restores_sharded(tmp_path):
    config = load_config(None, ["model.family=qwen2", "model.qkv_bias=true"], preset="tiny")
    params = init_params(config.model, jax.random.key(0))
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    d = save_model(tmp_path / "m", config, params, tokenizer_dir=tok)
    assert (d / "tokenizer" / "tokenizer.json").is_file()
    loaded_config, loaded = load_model(d)
    assert loaded_config == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, loaded)
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2)
    _, sharded = load_model(d, mesh=make_mesh(mesh_cfg), rules=mesh_cfg.rules())
    q = sharded["layers"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(params["layers"]["attn"]["q_proj"]
                                                            ["kernel"]))
    # unstacking (decoding's CPU layout): sliced on device when sharded, on host when not
    for a, b in zip(jax.tree.leaves(unstack_layers(sharded, config.model.num_layers)),
                    jax.tree.leaves(unstack_layers(loaded, config.model.num_layers))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CadenzaError, match="already exists"):
        save_model(d, config, params)


def test_load_rejects_non_model_directory(tmp_path):
    with pytest.raises(CadenzaError, match="not a cadenza model directory"):
        load_model(tmp_path)


def test_params_saved_sharded_load_onto_one_device(tmp_path):
    config = load_config(None, [], preset="tiny")
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2)
    sharded = init_params(config.model, jax.random.key(0), mesh=make_mesh(mesh_cfg),
                          rules=mesh_cfg.rules())
    d = save_model(tmp_path / "m", config, sharded)
    _, loaded = load_model(d)
    leaf = loaded["layers"]["mlp"]["up_proj"]["kernel"]
    assert len(leaf.devices()) == 1
    np.testing.assert_array_equal(np.asarray(leaf),
                                  np.asarray(sharded["layers"]["mlp"]["up_proj"]["kernel"]))


def test_safetensors_and_orbax_dirs_hold_the_same_params_exactly(tmp_path, monkeypatch):
    """params.safetensors (the single-process default) and an orbax params/ folder (what
    several processes and older cadenza write) load to the same leaves, dtypes included:
    bf16 floats and a quantised tree's uint8 codes and float32 scales."""
    from cadenza.models.quant import quantize_model

    config = load_config(None, ["model.param_dtype=bfloat16"], preset="tiny")
    params = init_params(config.model, jax.random.key(0))
    config, params = quantize_model(config, params, "int4")
    assert {str(a.dtype) for a in jax.tree.leaves(params)} == {"bfloat16", "uint8", "float32"}
    new = save_model(tmp_path / "new", config, params)
    old = save_model(tmp_path / "old", config, params, params_format="orbax")
    assert (new / "params.safetensors").is_file() and not (new / "params").exists()
    assert (new / "params.safetensors").stat().st_mode & 0o777 \
        == (new / "config.yaml").stat().st_mode & 0o777
    assert (old / "params").is_dir() and not (old / "params.safetensors").exists()
    with monkeypatch.context() as m:  # written for this model section: no re-tracing
        m.setattr("cadenza.models.params.abstract_params", None)
        assert jax.tree.structure(load_model(new)[1]) == jax.tree.structure(params)
    for d in (new, old):
        loaded_config, loaded = load_model(d)
        assert loaded_config == config
        assert jax.tree.structure(loaded) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_safetensors_params_that_do_not_fit_the_config_are_refused(tmp_path, caplog):
    import safetensors.numpy

    config = load_config(None, [], preset="tiny")
    d = save_model(tmp_path / "m", config, init_params(config.model, jax.random.key(0)))
    wider = load_config(None, ["model.vocab_size=300"], preset="tiny")
    (d / "config.yaml").write_text((d / "config.yaml").read_text().replace(
        f"vocab_size: {config.model.vocab_size}", "vocab_size: 300"))
    assert load_config(d / "config.yaml").model == wider.model
    with pytest.raises(CadenzaError, match=r"embed/embedding is float32\[512, "):
        load_model(d)
    safetensors.numpy.save_file({"x": np.zeros(2, np.float32)}, d / "params.safetensors")
    with pytest.raises(CadenzaError, match="not a cadenza params file"):
        load_model(d)
    with pytest.raises(CadenzaError, match="unknown params format"):
        save_model(tmp_path / "n", config, {}, params_format="npz")
    params = init_params(config.model, jax.random.key(0))
    with pytest.raises(CadenzaError, match=r"1 missing \(e.g. \['lm_head/kernel'\]\)"):
        save_model(tmp_path / "n", config, {k: v for k, v in params.items() if k != "lm_head"})
    bf16 = jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), params)
    _, loaded = load_model(save_model(tmp_path / "cast", config, bf16))  # counted, as restored
    assert {a.dtype for a in jax.tree.leaves(loaded)} == {np.dtype("float32")}
    assert "params cast to the config's dtypes: " in caplog.text
