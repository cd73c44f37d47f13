"""Parity with transformers: tiny random HF models of every family, imported, compared,
exported, reloaded by transformers and compared again.

One reference subprocess (torch imported once) serves the whole module.
"""

import json
import shutil

import jax
import numpy as np
import pytest

from cadenza.cli import main
from cadenza.models import Transformer, load_hf, load_model, save_hf
from cadenza.models.hf_check import check_hf
from cadenza.models.hf_reference import ReferenceSession
from cadenza.train.config import MeshConfig
from cadenza.train.mesh import make_mesh

BASE = {"vocab_size": 160, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# family name -> (model_type, config.json fields on top of BASE)
FAMILIES = {
    "llama": ("llama", {}),
    "llama3_rope": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "llama_linear_rope": ("llama", {"rope_parameters": {"rope_type": "linear",
                                                        "rope_theta": 10000.0, "factor": 2.0}}),
    "mistral": ("mistral", {"sliding_window": 4}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True, "eos_token_id": [2, 3]}),
    "gemma": ("gemma", {"head_dim": 32, "num_key_value_heads": 1}),
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": 4, "attn_logit_softcapping": 5.0,
                          "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 24}),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "gemma3_text": ("gemma3_text", {
        "head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 24,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2,
                            "sliding_window": 4}),
    "qwen2_moe": ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 32,
                                "shared_expert_intermediate_size": 48}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
                                "moe_intermediate_size": 32, "norm_topk_prob": True}),
    "olmoe": ("olmoe", {"num_experts": 4, "num_experts_per_tok": 2}),
}
TOKENS = np.random.default_rng(0).integers(0, BASE["vocab_size"], (2, 16)).astype(np.int32)
RTOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    with ReferenceSession() as session:
        yield session


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, ref):
    """{family: (hf_dir, reference logits on TOKENS)}, all made in one reference call."""
    root = tmp_path_factory.mktemp("hf")
    np.save(root / "tokens.npy", TOKENS)
    jobs = {"create": [], "logits": []}
    for seed, (family, (model_type, extra)) in enumerate(FAMILIES.items()):
        d = root / family
        jobs["create"].append({"dir": str(d), "model_type": model_type,
                               "config": {**BASE, **extra}, "seed": seed})
        jobs["logits"].append({"dir": str(d), "tokens": str(root / "tokens.npy"),
                               "out": str(root / f"{family}.npy")})
    ref.run(jobs)
    return {f: (root / f, np.load(root / f"{f}.npy")) for f in FAMILIES}


def _logits(config, params, tokens=TOKENS):
    fn = jax.jit(lambda p, t: Transformer(config).apply({"params": p}, t)[0])
    return np.asarray(fn(params, tokens))


def _assert_close(ours, ref):
    scale = max(1.0, float(np.abs(ref).max()))
    diff = float(np.abs(ours - ref).max())
    assert diff <= RTOL * scale, f"max |logit diff| {diff:.3e} > {RTOL} x scale {scale:.3g}"


def _assert_same_params(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_matches_transformers_logits(hf_models, family):
    hf_dir, ref_logits = hf_models[family]
    config, params = load_hf(hf_dir)
    assert config.family == FAMILIES[family][0]
    assert config.param_dtype == "float32"
    _assert_close(_logits(config, params), ref_logits)


def test_config_features_are_read(hf_models):
    assert load_hf(hf_models["llama3_rope"][0])[0].rope_scaling.type == "llama3"
    assert load_hf(hf_models["llama_linear_rope"][0])[0].rope_scaling.factor == 2.0
    assert load_hf(hf_models["mistral"][0])[0].layer_windows() == [4, 4, 4]
    gemma2 = load_hf(hf_models["gemma2"][0])[0]
    assert gemma2.layer_windows() == [4, 0, 4]
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == (5.0, 3.0)
    assert gemma2.attention_scale == 24 ** -0.5
    qwen2 = load_hf(hf_models["qwen2"][0])[0]
    assert qwen2.qkv_bias and qwen2.tie_embeddings and qwen2.eos_token_id == 2


@pytest.fixture(scope="module")
def exported(hf_models, tmp_path_factory, ref):
    """{family: (exported dir, imported params, check report)}; one reference call for all."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for family, (hf_dir, _) in hf_models.items():
        config, params = load_hf(hf_dir)
        # gemma2 is exported in several shards to exercise the index on both sides.
        shard = 40_000 if family == "gemma2" else 2**30
        out[family] = (save_hf((config, params), root / family, max_shard_bytes=shard), params)
    reports = check_hf([d for d, _ in out.values()], session=ref, num_prompts=TOKENS.shape[0],
                       prompt_len=TOKENS.shape[1])
    return {f: (d, p, r) for (f, (d, p)), r in zip(out.items(), reports)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_is_loaded_by_transformers_with_same_logits(exported, family):
    hf_dir, params, report = exported[family]
    print(report.format())
    assert report.passed, report.format()
    assert report.max_abs_diff.max() <= RTOL * report.logit_scale
    # Export then import is exact.
    _assert_same_params(load_hf(hf_dir)[1], params)


def test_sharded_export_has_an_index(exported):
    hf_dir = exported["gemma2"][0]
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((hf_dir / s).is_file() for s in shards)
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == [
        "Gemma2ForCausalLM"]


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_sharded_import_on_a_2x2x2_mesh_equals_unsharded(hf_models, family, tmp_path):
    hf_dir, ref_logits = hf_models[family]
    config, params = load_hf(hf_dir)
    mesh_config = MeshConfig(data=2, fsdp=2, tensor=2)
    _, sharded = load_hf(hf_dir, mesh=make_mesh(mesh_config), rules=mesh_config.rules())
    q = sharded["layers"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert {s.data.shape for s in q.addressable_shards} == {(3, 32, 2, 16)}
    _assert_same_params(sharded, params)
    # Exporting sharded params gathers them leaf by leaf; the result is the same checkpoint.
    _assert_same_params(load_hf(save_hf((config, sharded), tmp_path / "hf"))[1], params)


def test_cli_import_writes_a_model_directory_with_tokenizer_files(hf_models, tmp_path):
    hf_dir = shutil.copytree(hf_models["llama"][0], tmp_path / "hf_src")
    ref_logits = hf_models["llama"][1]
    (hf_dir / "tokenizer.json").write_text('{"version": "1.0"}')
    out = tmp_path / "model"
    assert main(["convert", "hf-import", str(hf_dir), str(out)]) == 0
    experiment, params = load_model(out)
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == [
        "generation_config.json", "tokenizer.json"]
    _assert_close(_logits(experiment.model, params), ref_logits)
    assert main(["convert", "hf-export", str(out), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    _assert_same_params(load_hf(tmp_path / "hf")[1], params)


def test_exported_tokenizer_encodes_like_cadenza_in_transformers(ref, tmp_path):
    """A cadenza-trained tokenizer (no BOS post-processor) as hf-export writes it
    (:func:`align_bos`): transformers' AutoTokenizer adds the same BOS and gives the same
    ids as cadenza's encode."""
    from cadenza.models.hf_export import align_bos
    from cadenza.models.tokenizer import load_tokenizer, train_tokenizer

    texts = ["def f(x):\n    return x + 1\n", "hello world", "  spaced\ttabs", "é ü ß"]
    tok = train_tokenizer(texts * 20, 300, tmp_path / "hf")
    assert align_bos(tmp_path / "hf") and not align_bos(tmp_path / "hf")  # once is enough
    ref.run({"encode": [{"dir": str(tmp_path / "hf"), "texts": texts,
                         "out": str(tmp_path / "ids.json")}]})
    theirs = json.loads((tmp_path / "ids.json").read_text())
    ours = [tok.encode(t) for t in texts]
    assert ours == theirs and all(ids[0] == tok.bos_id for ids in ours)
    assert [load_tokenizer(tmp_path / "hf").encode(t) for t in texts] == ours


# (Qwen3-MoE and OLMoE decode through the same MoE code as Mixtral; their forward parity
# above covers their routing differences. Qwen2-MoE: the shared expert.)
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text",
                                    "mixtral", "qwen2_moe"])
def test_greedy_decoding_matches_transformers_generate(hf_models, ref, tmp_path, family):
    """cadenza.decode.generate (greedy) == transformers' greedy generate, token for token,
    on the same converted weights; prompts of different lengths in one ragged batch."""
    from cadenza.decode import generate
    from cadenza.decode.config import DecodeConfig

    prompts = [TOKENS[0, :11].tolist(), TOKENS[1, :6].tolist()]
    new = 12
    for i, p in enumerate(prompts):
        np.save(tmp_path / f"p{i}.npy", np.asarray([p], np.int32))
    ref.run({"generate": [{"dir": str(hf_models[family][0]), "tokens": str(tmp_path / f"p{i}.npy"),
                           "max_new_tokens": new, "out": str(tmp_path / f"g{i}.npy")}
                          for i in range(len(prompts))]})
    expected = [np.load(tmp_path / f"g{i}.npy")[0].tolist() for i in range(len(prompts))]
    config, params = load_hf(hf_models[family][0], dtype="float32")
    result = generate(Transformer(config), params, prompts,
                      DecodeConfig(method="greedy", max_new_tokens=new, ignore_eos=True))
    assert result.token_ids == expected


def test_router_load_balancing_loss_matches_transformers(ref, tmp_path):
    from cadenza.models.moe import router_losses

    logits = np.random.default_rng(0).normal(size=(3, 40, 8)).astype(np.float32)
    np.save(tmp_path / "logits.npy", logits)
    ref.run({"router_loss": [{"logits": str(tmp_path / "logits.npy"), "top_k": 2,
                              "out": str(tmp_path / "loss.npy")}]})
    ours = router_losses(logits, 2)["load_balancing"]
    np.testing.assert_allclose(float(ours), np.load(tmp_path / "loss.npy"), rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "qwen3_moe", "mixtral", "olmoe",
                                    "qwen2_moe"])
def test_lora_adapter_round_trips_through_hf_peft(hf_models, ref, tmp_path, family):
    """A LoRA adapter on an imported model, exported in peft's format: transformers + peft
    give cadenza's logits, and importing it back gives the same adapter."""
    from cadenza.config import ExperimentConfig
    from cadenza.train import peft
    from cadenza.train.peft.artifacts import peft_export, peft_import
    from cadenza.train.peft_config import PeftConfig

    config, params = load_hf(hf_models[family][0])
    cfg = ExperimentConfig(model=config, peft=PeftConfig(method="lora", rank=4, alpha=8,
                                                         targets=".*(q|k|v|o)_proj"))
    pm, trainable, frozen = peft.prepare(cfg, params, jax.random.key(1))
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    trainable = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                             for x, k in zip(leaves, keys)])
    peft_export(tmp_path / "adapter", pm, trainable)
    np.save(tmp_path / "tokens.npy", TOKENS)
    ref.run({"peft_logits": [{"dir": str(hf_models[family][0]),
                              "adapter": str(tmp_path / "adapter"),
                              "tokens": str(tmp_path / "tokens.npy"),
                              "out": str(tmp_path / "out.npy")}]})
    ours = np.asarray(jax.jit(pm.apply)(trainable, frozen, TOKENS)[0])
    assert float(np.abs(ours - hf_models[family][1]).max()) > 1e-3  # the adapter matters
    _assert_close(ours, np.load(tmp_path / "out.npy"))
    _, back = peft_import(tmp_path / "adapter", cfg)
    _assert_same_params(back, trainable)
