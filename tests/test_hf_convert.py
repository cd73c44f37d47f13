"""HF import/export without transformers: round trips, config mapping, and every bad input
giving one clear error before anything compiles."""

import itertools
import json
import pickle
import struct

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from cadenza.cli import main
from cadenza.errors import CadenzaError
from cadenza.models import import_hf, init_params, load_hf, save_hf, unstack_layers
from cadenza.models.hf_check import compare_logits
from cadenza.models.hf_config import model_config_from_hf
from cadenza.models.hf_weights import (
    HEADS_BIAS,
    HEADS_IN,
    HEADS_OUT,
    SAME,
    TRANSPOSE,
    read_block,
    to_hf,
)


def _export(tiny_config, tmp_path, family="llama", *overrides, name="hf", **kwargs):
    config = tiny_config(family, *overrides)
    params = init_params(config, jax.random.key(0))
    return save_hf((config, params), tmp_path / name, **kwargs), config, params


def _rewrite(path, edit):
    """Rewrite a safetensors file after ``edit(dict of numpy arrays)``."""
    with safe_open(path, framework="numpy") as f:
        arrays = {n: f.get_tensor(n) for n in f.keys()}
    edit(arrays)
    save_file(arrays, path, metadata={"format": "pt"})


def _edit_config(hf_dir, **fields):
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(fields)
    (hf_dir / "config.json").write_text(json.dumps(config))


def _same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_bfloat16_round_trip_and_dtype_override(tiny_config, tmp_path):
    hf_dir, config, params = _export(tiny_config, tmp_path, "gemma2", "model.param_dtype=bfloat16",
                                     "model.dtype=bfloat16")
    with safe_open(hf_dir / "model.safetensors", framework="numpy") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}
        assert f.metadata() == {"format": "pt"}  # transformers refuses files without it
    # readable like any new file (the safetensors library alone writes owner-only 0600)
    assert (hf_dir / "model.safetensors").stat().st_mode & 0o777 \
        == (hf_dir / "config.json").stat().st_mode & 0o777
    loaded_config, loaded = load_hf(hf_dir)
    assert loaded_config.param_dtype == "bfloat16"
    out, notes = import_hf(hf_dir, tmp_path / "model", dtype="float32")
    assert "the checkpoint stores BF16; cast to float32" in notes
    with pytest.raises(CadenzaError, match="already exists"):
        import_hf(hf_dir, out)
    _same(loaded, params)
    _, as_f32 = load_hf(hf_dir, dtype="float32")
    assert as_f32["embed"]["embedding"].dtype == np.float32
    _same(as_f32, jax.tree.map(lambda a: a.astype(np.float32), params))


def test_unscanned_params_export_like_scanned(tiny_config, tmp_path):
    config = tiny_config("qwen2")
    params = init_params(config, jax.random.key(1))
    save_hf((config, unstack_layers(params, config.num_layers)), tmp_path / "hf")
    _same(load_hf(tmp_path / "hf")[1], params)


# layout -> (cadenza per-layer shape, axis of head_dim or None)
LAYOUTS = {SAME: ((6, 8), None), TRANSPOSE: ((6, 8), None), HEADS_IN: ((6, 4, 2), 2),
           HEADS_OUT: ((4, 2, 6), 1), HEADS_BIAS: ((4, 2), 1)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_blocks_in_cadenza_layout_read_only_their_bytes(tmp_path, layout):
    shape, hd_axis = LAYOUTS[layout]
    full = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)  # cadenza layout
    save_file({"w": np.ascontiguousarray(to_hf(layout, full))}, tmp_path / "w.safetensors")
    reads = []

    class Counted:  # the safetensors slice, counting the elements each read returns
        def __getitem__(self, index):
            block = tensor[index]
            reads.append(block.size)
            return block

    options = [[slice(None), slice(0, n // 2), slice(n // 2, n), slice(1, n, 2)] for n in shape]
    with safe_open(tmp_path / "w.safetensors", framework="numpy") as f:
        tensor = f.get_slice("w")
        for index in itertools.product(*options):
            reads.clear()
            np.testing.assert_array_equal(read_block(layout, Counted(), shape, index),
                                          full[index], err_msg=str(index))
            # Shard-like blocks (contiguous, head_dim whole) read exactly their elements.
            if all(s.step is None for s in index) and (
                    hd_axis is None or index[hd_axis] == slice(None)):
                assert sum(reads) == full[index].size, index


def test_config_json_mapping_v4_style_and_notes():
    hf = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
          "rope_theta": 500000.0, "torch_dtype": "bfloat16", "eos_token_id": [7, 9],
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    config, notes = model_config_from_hf(hf)
    assert config.rope_theta == 500000.0 and config.rope_scaling.type == "llama3"
    assert config.param_dtype == "bfloat16" and config.eos_token_id == 7
    assert any("first, 7" in n for n in notes)
    with pytest.raises(CadenzaError, match="partial rotary embeddings are not supported"):
        model_config_from_hf({**hf, "partial_rotary_factor": 0.5})
    with pytest.raises(CadenzaError, match="rope type 'yarn' is not supported"):
        model_config_from_hf({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    gemma2 = {**hf, "model_type": "gemma2", "sliding_window": 8,
              "layer_types": ["full_attention", "sliding_attention"]}
    with pytest.raises(CadenzaError, match="match no cadenza pattern"):
        model_config_from_hf(gemma2)


def test_only_the_keys_each_family_reads_are_read():
    """Llama and Gemma ignore soft-capping keys in transformers, so cadenza does too (and
    says so); Gemma 2/3 apply them. Gemma 3's layer pattern and local rope base come
    from its defaults when config.json leaves them out."""
    base = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 6,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
            "head_dim": 8, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    for family in ("llama", "gemma"):
        config, notes = model_config_from_hf({**base, "model_type": family})
        assert (config.attn_logit_softcap, config.final_logit_softcap) == (0.0, 0.0)
        assert any("softcapping set but ignored" in n for n in notes), family
    gemma2, _ = model_config_from_hf({**base, "model_type": "gemma2"})
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == (50.0, 30.0)
    gemma3, _ = model_config_from_hf({**base, "model_type": "gemma3_text"})
    assert gemma3.layer_windows() == [4096] * 5 + [0]
    assert (gemma3.rope_theta, gemma3.local_rope_theta) == (1e6, 1e4)
    assert gemma3.attention_scale == 256 ** -0.5 and gemma3.qk_norm == "head"
    # transformers-4 style (as the Gemma 3 12B config.json on the Hub)
    v4, _ = model_config_from_hf({**base, "model_type": "gemma3_text", "rope_theta": 1e6,
                                  "rope_local_base_freq": 1e4, "sliding_window": 8,
                                  "sliding_window_pattern": 3,
                                  "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert (v4.rope_scaling.type, v4.rope_scaling.factor, v4.local_rope_theta) == (
        "linear", 8.0, 1e4)
    assert v4.layer_windows() == [8, 8, 0, 8, 8, 0]
    moe = {**base, "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 16}
    assert model_config_from_hf(moe)[0].expert_size == 16
    with pytest.raises(CadenzaError, match="dense layers between MoE layers"):
        model_config_from_hf({**moe, "mlp_only_layers": [1]})
    with pytest.raises(CadenzaError, match="clip_qkv"):
        model_config_from_hf({**moe, "model_type": "olmoe", "clip_qkv": 8.0})


@pytest.mark.parametrize("field,value,match", [
    ("auto_map", {"AutoModelForCausalLM": "modeling_x.X"}, "never runs remote code"),
    ("model_type", "phi3", "model_type 'phi3' is not supported"),
    ("attention_bias", True, "attention biases"),
])
def test_refused_configs(tiny_config, tmp_path, field, value, match):
    hf_dir = _export(tiny_config, tmp_path)[0]
    _edit_config(hf_dir, **{field: value})
    with pytest.raises(CadenzaError, match=match):
        load_hf(hf_dir)


def test_truncated_safetensors(tiny_config, tmp_path):
    hf_dir = _export(tiny_config, tmp_path)[0]
    f = hf_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CadenzaError, match="file is truncated") as e:
        load_hf(hf_dir)
    assert "model.safetensors" in str(e.value) and "download the file again" in str(e.value)
    f.write_bytes(b"\x01\x02\x03")
    with pytest.raises(CadenzaError, match="no safetensors header"):
        load_hf(hf_dir)


def test_header_with_wrong_byte_counts(tiny_config, tmp_path):
    hf_dir = _export(tiny_config, tmp_path)[0]
    f = hf_dir / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["shape"][0] -= 1  # its byte range now holds one value too many
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    with pytest.raises(CadenzaError, match="byte range does not match its shape and dtype") as e:
        load_hf(hf_dir)
    assert "model.safetensors" in str(e.value) and "download the file again" in str(e.value)


def test_missing_shard(tiny_config, tmp_path):
    hf_dir = _export(tiny_config, tmp_path, max_shard_bytes=100_000)[0]
    shards = sorted(hf_dir.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(CadenzaError, match=f"1 of {len(shards)} shards .* missing: "
                                           f"{shards[1].name}"):
        load_hf(hf_dir)


def test_wrong_directory_levels(tiny_config, tmp_path):
    hf_dir = _export(tiny_config, tmp_path, name="models--org--tiny/snapshots/abc123")[0]
    with pytest.raises(CadenzaError, match=f"wrong directory level.*below it: {hf_dir}"):
        load_hf(tmp_path / "models--org--tiny")
    (hf_dir / "original").mkdir()
    with pytest.raises(CadenzaError, match=f"one level up: {hf_dir}"):
        load_hf(hf_dir / "original")
    with pytest.raises(CadenzaError, match=f"expected a directory.*{hf_dir}"):
        load_hf(hf_dir / "config.json")
    with pytest.raises(CadenzaError, match="no such directory"):
        load_hf(tmp_path / "nowhere")


def test_padded_vocab_is_reported_with_the_fix(tiny_config, tmp_path):
    hf_dir, config, _ = _export(tiny_config, tmp_path)
    _edit_config(hf_dir, vocab_size=config.vocab_size - 12)
    with pytest.raises(CadenzaError) as e:
        load_hf(hf_dir)
    msg = str(e.value)
    assert "shape mismatches (2)" in msg and "model.embed_tokens.weight" in msg
    assert "lm_head.weight" in msg and f"needs vocab_size={config.vocab_size}" in msg


def test_every_problem_is_listed_in_one_error(tiny_config, tmp_path):
    hf_dir, config, _ = _export(tiny_config, tmp_path)
    _edit_config(hf_dir, num_key_value_heads=4)

    def edit(arrays):
        arrays["model.layers.0.mlp.up_projection.weight"] = arrays.pop(
            "model.layers.0.mlp.up_proj.weight")
        arrays["model.norm.weight"] = arrays["model.norm.weight"].astype(np.int8)

    _rewrite(hf_dir / "model.safetensors", edit)
    with pytest.raises(CadenzaError) as e:
        load_hf(hf_dir)
    msg = str(e.value)
    assert "missing tensors (1):\n  - model.layers.0.mlp.up_proj.weight" in msg
    assert "unexpected tensors (1):\n  - model.layers.0.mlp.up_projection.weight" in msg
    assert f"shape mismatches ({2 * config.num_layers})" in msg
    assert "num_key_value_heads=4" in msg and "2 heads of head_dim" in msg
    assert "wrong dtypes (quantized weights need a quantization_config" in msg
    assert "model.norm.weight: I8, expected F64 or F32 or F16 or BF16" in msg


def test_tied_config_with_an_output_head_says_so(tiny_config, tmp_path):
    hf_dir = _export(tiny_config, tmp_path)[0]
    _edit_config(hf_dir, tie_word_embeddings=True)
    with pytest.raises(CadenzaError, match="set tie_word_embeddings: false"):
        load_hf(hf_dir)


def test_pickle_checkpoints_are_refused_without_unpickling(tiny_config, tmp_path):
    hf_dir = _export(tiny_config, tmp_path)[0]
    weights = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (hf_dir / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    with pytest.raises(CadenzaError, match="cadenza never unpickles"):
        load_hf(hf_dir)
    assert not marker.exists()
    # Beside safetensors, pickles and stray safetensors files are ignored, and said to be.
    (hf_dir / "model.safetensors").write_bytes(weights)
    (hf_dir / "consolidated.safetensors").write_bytes(b"")
    _, notes = import_hf(hf_dir, tmp_path / "model")
    assert "ignored pickle files (never loaded): pytorch_model.bin" in notes
    assert "ignored safetensors files not part of the model: consolidated.safetensors" in notes
    assert not marker.exists()


def test_export_refuses_what_transformers_cannot_express(tiny_config, tmp_path):
    config = tiny_config("llama", "model.sliding_window=4", "model.local_layers=even")
    params = init_params(config, jax.random.key(0))
    with pytest.raises(CadenzaError, match="cannot express this config.*windows"):
        save_hf((config, params), tmp_path / "hf")
    _export(tiny_config, tmp_path)
    with pytest.raises(CadenzaError, match="already exists"):
        _export(tiny_config, tmp_path)


def test_check_report_verdicts():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 5, 11)).astype(np.float32) * 4
    tokens = np.zeros((2, 5), np.int32)
    good = compare_logits("d", tokens, ref, ref + 1e-5, rtol=1e-4, kl_tol=1e-6)
    assert good.passed and good.top1_agree.all() and "PASS" in good.format()
    bad_ours = ref.copy()
    bad_ours[1, 3, 0] += 1.0
    bad = compare_logits("d", tokens, ref, bad_ours, rtol=1e-4, kl_tol=1e-6)
    assert not bad.passed and bad.max_abs_diff[1, 3] == pytest.approx(1.0)
    assert bad.kl[1, 3] > 1e-6 and bad.kl[0].max() == 0.0 and bad.format().endswith("FAIL")
    # one line per prompt naming its worst position; --verbose adds every position
    short, long = bad.format().splitlines(), bad.format(verbose=True).splitlines()
    assert len(short) == 1 + 2 + 1 and "(position 3)" in short[2]
    assert len(long) == len(short) + 2 * (1 + 5) and sum("DIFF" in x for x in long) <= 1


def test_cli_check_without_reference_env_is_one_clear_error(tiny_config, tmp_path, capsys,
                                                            monkeypatch):
    hf_dir = _export(tiny_config, tmp_path)[0]
    monkeypatch.setenv("CADENZA_REF_PYTHON", str(tmp_path / "no-python"))
    assert main(["convert", "check", str(hf_dir)]) == 2
    err = capsys.readouterr().err
    assert "reference environment is not available" in err and "make ref-env" in err
