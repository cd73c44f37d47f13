"""Quantized HF checkpoints (compressed-tensors int8 per channel, int4 per group): imported
without re-quantising, compared with transformers on the dequantized model; everything
else refused naming the quantization_config field.

The quantized folders are written here following the compressed-tensors layout
(``weight_packed`` int32 words holding ``code + 2**(bits-1)`` at bit ``i * bits``,
``weight_scale``, ``weight_shape``; scales ``absmax / ((qmax - qmin) / 2)``, codes
``clamp(round(w / scale), qmin, qmax)``). The reference is transformers' logits of the
float model whose weights are ``code * scale``.
"""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cadenza.errors import CadenzaError
from cadenza.models import Transformer, load_hf, load_model, quant
from cadenza.models.hf_config import model_config_from_hf
from cadenza.models.hf_import import import_hf
from cadenza.models.hf_reference import ReferenceSession

CONFIG = {"vocab_size": 160, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
TOKENS = np.random.default_rng(1).integers(0, CONFIG["vocab_size"], (2, 12)).astype(np.int32)
GROUP = 32
SCHEMES = {"int8": {"num_bits": 8, "strategy": "channel", "group_size": None},
           "int4": {"num_bits": 4, "strategy": "group", "group_size": GROUP}}


def quantization_config(scheme: str, fmt: str = "pack-quantized", **weights) -> dict:
    """A compressed-tensors quantization_config as llm-compressor writes it (W8A16 / W4A16)."""
    args = {"type": "int", "symmetric": True, "dynamic": False, "actorder": None,
            "observer": "minmax", **SCHEMES[scheme], **weights}
    return {"quant_method": "compressed-tensors", "format": fmt,
            "quantization_status": "compressed", "ignore": ["lm_head"], "kv_cache_scheme": None,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": args,
                                          "input_activations": None,
                                          "output_activations": None, "format": None}}}


def _quantize(w: np.ndarray, bits: int, group: int | None):
    """(codes int8 [out, in], scale float32 [out, groups]) of compressed-tensors' symmetric
    min-max quantisation of ``w`` [out, in]."""
    qmax, qmin = 2 ** (bits - 1) - 1, -2 ** (bits - 1)
    out, k = w.shape
    g = group or k
    absmax = np.abs(w.reshape(out, k // g, g)).max(axis=-1)
    scale = (absmax / ((qmax - qmin) / 2)).astype(np.float32)
    codes = np.clip(np.round(w / np.repeat(scale, g, axis=1)), qmin, qmax).astype(np.int8)
    return codes, scale


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """int32 words [out, in * bits / 32]: element i at bit i * bits, plus 2**(bits-1)."""
    u = (codes.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    return np.ascontiguousarray(u).view("<i4")


def write_quantized(src, dst, deq, scheme: str):
    """The float HF folder ``src`` quantized into ``dst`` (compressed-tensors layout) and,
    into ``deq``, the float model of its dequantized weights (``code * scale``)."""
    bits, group = SCHEMES[scheme]["num_bits"], SCHEMES[scheme]["group_size"]
    tensors = load_file(src / "model.safetensors")
    packed, dequant = {}, {}
    for name, w in tensors.items():
        if not name.endswith("_proj.weight"):
            packed[name] = dequant[name] = w
            continue
        codes, scale = _quantize(w, bits, group)
        base = name.removesuffix(".weight")
        dequant[name] = codes.astype(np.float32) * np.repeat(scale, group or w.shape[1], axis=1)
        packed[f"{base}.weight_scale"] = scale
        packed[f"{base}.weight_packed"] = _pack(codes, bits)
        packed[f"{base}.weight_shape"] = np.array(w.shape, np.int64)
    hf = json.loads((src / "config.json").read_text())
    for d, weights, extra in ((dst, packed, {"quantization_config": quantization_config(
            scheme)}), (deq, dequant, {})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**hf, **extra}))
        save_file(weights, d / "model.safetensors")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{scheme: (quantized dir, dequantized dir, reference logits)}."""
    root = tmp_path_factory.mktemp("hfq")
    np.save(root / "tokens.npy", TOKENS)
    out, jobs = {}, []
    with ReferenceSession() as ref:
        ref.run({"create": [{"dir": str(root / "float"), "model_type": "llama",
                             "config": CONFIG, "seed": 3}]})
        for scheme in SCHEMES:
            q, deq = root / scheme, root / f"{scheme}-deq"
            write_quantized(root / "float", q, deq, scheme)
            jobs.append({"dir": str(deq), "tokens": str(root / "tokens.npy"),
                         "out": str(deq / "logits.npy")})
            out[scheme] = (q, deq)
        ref.run({"logits": jobs})
    return {k: (q, deq, np.load(deq / "logits.npy")) for k, (q, deq) in out.items()}


def _logits(config, params):
    return np.asarray(jax.jit(lambda p, t: Transformer(config).apply({"params": p}, t)[0])(
        params, TOKENS))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_quantized_import_keeps_the_codes_and_matches_transformers(folders, scheme):
    qdir, deqdir, ref_logits = folders[scheme]
    config, params = load_hf(qdir)
    assert (config.weight_quant, config.weight_quant_group) == (scheme, GROUP if scheme == "int4"
                                                                 else 128)
    assert "lm_head" not in config.weight_quant_targets   # ignored by the checkpoint: float
    assert "kernel" in params["lm_head"]
    assert quant.count_quantized(params) == 7             # q k v o gate up down
    _, float_params = load_hf(deqdir)
    kernels = {(m, n): p["kernel"] for m in ("attn", "mlp")
               for n, p in float_params["layers"][m].items()}

    @jax.jit
    def dequantized(layers):   # every projection's kernel back from the imported arrays
        return {(m, n): jax.vmap(lambda q, k=k, n=n: quant.dequantize_kernel(
            q, k.shape[1:], 2 if n == "o_proj" else 1, scheme))(layers[m][n])
            for (m, n), k in kernels.items()}

    for (m, n), back in dequantized(params["layers"]).items():
        assert set(params["layers"][m][n]) == {quant.QWEIGHT, quant.QSCALE}
        np.testing.assert_array_equal(np.asarray(back), np.asarray(kernels[m, n]), err_msg=n)
    ours = _logits(config, params)
    scale = max(1.0, float(np.abs(ref_logits).max()))
    assert float(np.abs(ours - ref_logits).max()) <= 1e-4 * scale


def test_imported_quantized_model_directory_loads_the_same_params(folders, tmp_path):
    qdir = folders["int4"][0]
    config, params = load_hf(qdir)
    out, notes = import_hf(qdir, tmp_path / "model")
    assert any("int4 weights" in n for n in notes)
    experiment, loaded = load_model(out)
    assert experiment.model == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 loaded, params)


def test_inconsistent_quantized_tensors_are_refused(folders, tmp_path):
    qdir = folders["int8"][0]
    bad = tmp_path / "bad"
    shutil.copytree(qdir, bad)
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.self_attn.q_proj.weight_shape"]
    tensors["model.layers.0.mlp.up_proj.weight_scale"] = tensors[
        "model.layers.0.mlp.up_proj.weight_scale"][:-1]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CadenzaError) as err:
        load_hf(bad)
    assert "q_proj.weight_shape" in str(err.value) and "up_proj.weight_scale" in str(err.value)
    del tensors["model.layers.1.mlp.down_proj.weight_scale"]    # quantized in layer 0 only
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CadenzaError, match="quantized in some layers only: .*down_proj"):
        load_hf(bad)


HF = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1,
      "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 512}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}
AWQ = {"quant_method": "awq", "bits": 4, "zero_point": True, "version": "gemm"}
BNB = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic"}


def _with_group(**changes):
    qc = quantization_config("int4")
    group = qc["config_groups"]["group_0"]
    for key, value in changes.items():
        (group["weights"] if key in group["weights"] else group)[key] = value
    return qc


@pytest.mark.parametrize("qc, field", [
    (GPTQ, "quantization_config.quant_method: .*gptq"),
    (AWQ, "quantization_config.quant_method: .*awq"),
    (BNB, "quantization_config.quant_method: .*bitsandbytes"),
    (FP8, "quantization_config.quant_method: .*fp8"),
    (_with_group(symmetric=False), r"weights.symmetric: .*asymmetric"),
    (_with_group(actorder="group"), r"weights.actorder: .*actorder 'group'"),
    (_with_group(type="float", num_bits=8), r"weights.type: .*type 'float'"),
    (_with_group(strategy="channel"), r"weights.strategy: .*strategy 'channel'"),
    (quantization_config("int8", strategy="group", group_size=128),
     r"weights.strategy: .*8-bit weights with strategy 'group'"),
    (quantization_config("int4", fmt="marlin-24"),
     r"quantization_config.format: .*format 'marlin-24'"),
    (quantization_config("int4", fmt="int-quantized"),
     r"quantization_config.format: .*format 'int-quantized'"),
    (_with_group(input_activations={"num_bits": 8, "type": "int"}),
     r"group_0.input_activations: .*weight-only"),
    ({**quantization_config("int8"), "sparsity_config": {"format": "sparse-24-bitmask"}},
     r"quantization_config.sparsity_config: "),
    ({**quantization_config("int8"), "quantization_status": "frozen"},
     r"quantization_status: .*'frozen'"),
])
def test_unmappable_quantization_configs_are_refused_naming_the_field(qc, field):
    with pytest.raises(CadenzaError, match=field) as err:
        model_config_from_hf({**HF, "quantization_config": qc})
    assert "cadenza imports compressed-tensors" in str(err.value)
    assert "\n" not in str(err.value)
