"""Adapter artifacts: orbax save/load, Hugging Face peft export/import and parity, CLI."""

import dataclasses
import json
import os
import pathlib
import subprocess
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.cli import main
from cadenza.config import load_config
from cadenza.errors import CadenzaError
from cadenza.models import Transformer, init_params, save_model, stack_layers
from cadenza.train import peft
from cadenza.train.peft.artifacts import load_adapters, peft_export, peft_import, save_adapters

REF_PY = pathlib.Path(__file__).resolve().parents[1] / ".venv-ref" / "bin" / "python"


def _lora(*overrides):
    cfg = load_config(None, ["peft.method=lora", "peft.rank=4", *overrides], preset="tiny")
    params = init_params(cfg.model, jax.random.key(0))
    pm, trainable, frozen = peft.prepare(cfg, params, jax.random.key(1))
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    trainable = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                             for x, k in zip(leaves, keys)])
    return cfg, params, pm, trainable, frozen


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_load_adapters_and_reject_another_base(tmp_path):
    cfg, _, pm, trainable, _ = _lora("peft.method=dora")
    save_adapters(tmp_path / "ad", cfg, trainable)
    assert not list((tmp_path / "ad").rglob("*embed*"))  # the base is not saved
    pm2, back = load_adapters(tmp_path / "ad", cfg)
    assert pm2.method == "dora"
    _same(back, trainable)
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_heads=8))
    with pytest.raises(CadenzaError, match="another base"):
        load_adapters(tmp_path / "ad", other)
    gemma = load_config(None, ["model.family=gemma", "model.num_kv_heads=1"], preset="tiny")
    with pytest.raises(CadenzaError, match="another base"):
        load_adapters(tmp_path / "ad", gemma)


def test_peft_export_import_round_trip(tmp_path):
    cfg, _, pm, trainable, _ = _lora("peft.targets=.*(q|o|down)_proj", "peft.rslora=true")
    peft_export(tmp_path / "hf", pm, trainable)
    hf = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert hf["target_modules"] == ["down_proj", "o_proj", "q_proj"] and hf["use_rslora"]
    from safetensors.numpy import load_file
    t = load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))
    assert t["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (4, 64)
    assert t["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    pm2, back = peft_import(tmp_path / "hf", cfg)
    assert pm2.peft_config.scaling == pm.peft_config.scaling
    _same(back, trainable)
    # unscanned base: the same adapter file maps onto layer_i paths
    unscanned = load_config(None, ["model.scan_layers=false"], preset="tiny")
    pm3, back3 = peft_import(tmp_path / "hf", unscanned)
    np.testing.assert_array_equal(back3["peft"]["layer_1"]["attn"]["q_proj"]["lora_b"],
                                  trainable["peft"]["layers"]["attn"]["q_proj"]["lora_b"][1])
    # an adapter for a wider base fails clearly
    wide = load_config(None, ["model.hidden_size=128"], preset="tiny")
    with pytest.raises(CadenzaError, match="another base"):
        peft_import(tmp_path / "hf", wide)
    shallow = load_config(None, ["model.num_layers=1", "model.scan_layers=false"], preset="tiny")
    with pytest.raises(CadenzaError, match="does not have"):
        peft_import(tmp_path / "hf", shallow)


_REF_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    mode, base_dir = sys.argv[1], sys.argv[2]
    if mode == "base":
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=192,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          rms_norm_eps=1e-5, max_position_embeddings=1024,
                          tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(base_dir)
        sys.exit(0)
    tokens = torch.tensor(np.load(sys.argv[3]))
    shapes = {}
    for adapter_dir in sys.argv[4:]:
        base = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
        hf = json.load(open(adapter_dir + "/adapter_config.json"))
        ref = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                             LoraConfig(r=hf["r"], lora_alpha=hf["lora_alpha"],
                                        target_modules=hf["target_modules"],
                                        use_rslora=hf["use_rslora"], use_dora=hf["use_dora"]))
        shapes[adapter_dir] = {k: list(v.shape)
                               for k, v in get_peft_model_state_dict(ref).items()}
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
        with torch.no_grad():
            np.save(adapter_dir + "/ref_logits.npy",
                    model(input_ids=tokens).logits.float().numpy())
    print(json.dumps(shapes))
""")


def _run_ref(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([str(REF_PY), *args], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _hf_llama_to_params(path, num_layers):
    """Test-local HF Llama -> cadenza params (until cadenza.models.hf is on main)."""
    from safetensors.numpy import load_file
    w = load_file(str(path))
    p = {"embed": {"embedding": w["model.embed_tokens.weight"]},
         "final_norm": {"scale": w["model.norm.weight"]},
         "lm_head": {"kernel": w["lm_head.weight"].T}}
    for i in range(num_layers):
        g = lambda n: w[f"model.layers.{i}.{n}.weight"]  # noqa: E731
        d = g("self_attn.q_proj").shape[1]
        heads = lambda x: x.T.reshape(d, -1, 16)  # noqa: E731
        p[f"layer_{i}"] = {
            "attn_norm": {"scale": g("input_layernorm")},
            "mlp_norm": {"scale": g("post_attention_layernorm")},
            "attn": {"q_proj": {"kernel": heads(g("self_attn.q_proj"))},
                     "k_proj": {"kernel": heads(g("self_attn.k_proj"))},
                     "v_proj": {"kernel": heads(g("self_attn.v_proj"))},
                     "o_proj": {"kernel": g("self_attn.o_proj").T.reshape(-1, 16, d)}},
            "mlp": {n: {"kernel": g(f"mlp.{n}").T} for n in ("gate_proj", "up_proj",
                                                             "down_proj")}}
    return jax.tree.map(jnp.asarray, stack_layers(p, num_layers))


@pytest.mark.skipif(not REF_PY.exists(), reason="reference env not built (make ref-env)")
def test_exported_adapters_match_hf_peft_logits(tmp_path):
    """LoRA and DoRA exported from cadenza, loaded by HF peft on the same base: same logits."""
    script = tmp_path / "ref.py"
    script.write_text(_REF_SCRIPT)
    _run_ref(str(script), "base", str(tmp_path / "base"))
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 12), 0, 512), np.int64)
    np.save(tmp_path / "tokens.npy", tokens)
    params, runs = None, {}
    for method in ("lora", "dora"):
        cfg = load_config(None, [f"peft.method={method}", "peft.rank=4", "peft.alpha=8",
                                 "peft.targets=.*_proj"], preset="tiny")
        if params is None:
            params = _hf_llama_to_params(tmp_path / "base" / "model.safetensors",
                                         cfg.model.num_layers)
        pm, trainable, frozen = peft.prepare(cfg, params, jax.random.key(1))
        leaves, treedef = jax.tree.flatten(trainable)
        keys = jax.random.split(jax.random.key(5), len(leaves))
        trainable = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                                 for x, k in zip(leaves, keys)])
        peft_export(tmp_path / method, pm, trainable)
        runs[method] = jax.jit(pm.apply)(trainable, frozen, jnp.asarray(tokens, jnp.int32))[0]
    ref_shapes = json.loads(_run_ref(str(script), "peft", str(tmp_path / "base"),
                                     str(tmp_path / "tokens.npy"), str(tmp_path / "lora"),
                                     str(tmp_path / "dora")).strip().splitlines()[-1])
    from safetensors.numpy import load_file
    base = Transformer(cfg.model).apply({"params": params}, jnp.asarray(tokens, jnp.int32))[0]
    for method, logits in runs.items():
        ours = {k: list(v.shape) for k, v in
                load_file(str(tmp_path / method / "adapter_model.safetensors")).items()}
        assert ours == ref_shapes[str(tmp_path / method)]
        assert float(jnp.abs(logits - base).max()) > 1e-3  # the adapters do something
        np.testing.assert_allclose(logits, np.load(tmp_path / method / "ref_logits.npy"),
                                   atol=2e-4, rtol=1e-4)


def test_cli_merge_export_import(tmp_path, capsys):
    cfg, params, pm, trainable, frozen = _lora()
    base_cfg = dataclasses.replace(cfg, peft=type(cfg.peft)())
    save_model(tmp_path / "base", base_cfg, params)
    save_adapters(tmp_path / "ad", cfg, trainable)
    assert main(["convert", "merge-lora", "--model", str(tmp_path / "base"), "--adapter",
                 str(tmp_path / "ad"), "--out", str(tmp_path / "merged")]) == 0
    from cadenza.models import load_model
    _, merged = load_model(tmp_path / "merged")
    tokens = jnp.asarray([[4, 9, 2, 7]])
    np.testing.assert_allclose(Transformer(cfg.model).apply({"params": merged}, tokens)[0],
                               pm.apply(trainable, frozen, tokens)[0], atol=2e-5)
    assert main(["convert", "peft-export", "--model", str(tmp_path / "base"), "--adapter",
                 str(tmp_path / "ad"), "--out", str(tmp_path / "hf")]) == 0
    assert main(["convert", "peft-import", "--model", str(tmp_path / "base"), "--hf-adapter",
                 str(tmp_path / "hf"), "--out", str(tmp_path / "ad2")]) == 0
    _same(load_adapters(tmp_path / "ad2", base_cfg)[1], trainable)
    assert main(["convert", "peft-import", "--model", str(tmp_path / "base"), "--hf-adapter",
                 str(tmp_path / "nothing"), "--out", str(tmp_path / "ad3")]) == 2
    assert "not a peft adapter" in capsys.readouterr().err
