"""Model directories: save, load, sharded restore, and clear errors."""

import jax
import numpy as np
import pytest

from cadenza.config import load_config
from cadenza.errors import CadenzaError
from cadenza.models import init_params, load_model, save_model
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
