"""Multi-adapter batches (cadenza.decode.multi_lora): rows with different LoRA adapters and
base-only rows in one batch decode like separate merged models; ranks differ; adapter
directories and peft folders load; bad banks are refused; changing the rows' adapters
does not recompile."""

import dataclasses
import json
import os
import pathlib
import subprocess
import textwrap

import jax
import numpy as np
import pytest

from cadenza.config import load_config
from cadenza.decode import DecodeConfig, driver, generate, stream
from cadenza.decode.multi_lora import load_adapter_bank, parse_adapter_specs
from cadenza.errors import CadenzaError
from cadenza.models import Transformer, init_params
from cadenza.train import peft
from cadenza.train.peft import merge
from cadenza.train.peft.artifacts import peft_export, save_adapters

REF_PY = pathlib.Path(__file__).resolve().parents[1] / ".venv-ref" / "bin" / "python"
SMALL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_heads=2",
         "model.num_kv_heads=2"]
GREEDY = DecodeConfig(max_new_tokens=6, ignore_eos=True)
PROMPTS = [[1, 5, 7], [1, 9, 3, 4, 5, 6], [1, 2], [1, 30, 31, 32], [1, 8]]


def _adapter(params, seed, *overrides, base=SMALL):
    """``(config, peft model, trainable, frozen)``: an adapter with random (non-zero) B."""
    cfg = load_config(None, base + list(overrides), preset="tiny")
    pm, trainable, frozen = peft.prepare(cfg, params, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    trainable = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape)
                                             for x, k in zip(leaves, keys)])
    return cfg, pm, trainable, frozen


@pytest.fixture(scope="module")
def bank_setup(tmp_path_factory):
    """A small base and three saved adapters: ``a`` (rank 2 on q and v), ``b`` (rank 4 with
    rsLoRA on every projection and the LM head) and ``c`` (DoRA, rank 3 on k, o and up)."""
    d = tmp_path_factory.mktemp("multilora")
    base_cfg = load_config(None, SMALL, preset="tiny")
    params = init_params(base_cfg.model, jax.random.key(0))
    params = {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * 30.0}}
    adapters = {
        "a": _adapter(params, 1, "peft.method=lora", "peft.rank=2", r"peft.targets=.*(q|v)_proj"),
        "b": _adapter(params, 2, "peft.method=lora", "peft.rank=4", "peft.rslora=true",
                      "peft.alpha=4", r"peft.targets=.*_proj|lm_head"),
        "c": _adapter(params, 3, "peft.method=dora", "peft.rank=3",
                      r"peft.targets=.*(k|o|up)_proj"),
    }
    dirs = {name: save_adapters(d / name, cfg, trainable)
            for name, (cfg, _, trainable, _) in adapters.items()}
    return d, base_cfg, params, adapters, dirs


def test_mixed_batch_equals_merged_models_and_ids_do_not_recompile(bank_setup):
    _, base_cfg, params, adapters, dirs = bank_setup
    # DoRA first: base rows (id -1) gather index 0 and must not pick up its scaling
    bank = load_adapter_bank(base_cfg, {k: dirs[k] for k in "cab"}, base_params=params)
    assert bank.names == ("c", "a", "b") and bank.rank == 4
    q = bank.factors["layers"]["attn"]["q_proj"]
    assert q["lora_a"].shape == (2, 3, 32, 4)     # [layers, adapters, in, padded rank]
    assert not np.asarray(q["lora_a"][:, 1, :, 2:]).any()            # a's rank 2 padded
    assert not np.asarray(bank.factors["layers"]["attn"]["k_proj"]["lora_b"][:, 1]).any()
    model = Transformer(base_cfg.model)
    want = {None: generate(model, params, PROMPTS, GREEDY).token_ids}
    merged = {name: merge.merge(pm, trainable, frozen)
              for name, (_, pm, trainable, frozen) in adapters.items()}
    for name, m in merged.items():
        want[name] = generate(model, m, PROMPTS, GREEDY).token_ids
    assert len({str(t) for t in want.values()}) == 4    # the adapters change the output

    # the scanned layout as a GPU/TPU decodes it (on CPU generate unrolls the layers)
    tokens = np.asarray([PROMPTS[1], PROMPTS[1][::-1], PROMPTS[1], PROMPTS[1]], np.int32)
    logits = jax.jit(bank.forward)(bank.params(params, ["b", None, "a", "c"]), tokens)[0]
    for row, name in enumerate(["b", None, "a", "c"]):
        m = params if name is None else merged[name]
        alone = model.apply({"params": m}, tokens[row:row + 1])[0][0]
        np.testing.assert_allclose(logits[row], alone, rtol=1e-4, atol=1e-3, err_msg=str(name))

    names = ["a", None, "b", "c", "b"]
    res = generate(bank.forward, bank.params(params, names), PROMPTS, GREEDY)
    assert res.token_ids == [want[n][i] for i, n in enumerate(names)]
    before = driver.COMPILES["count"]
    names = ["b", "c", None, None, "a"]
    res = generate(bank.forward, bank.params(params, ["a"] * 5), PROMPTS, GREEDY,
                   adapters=names)
    assert res.token_ids == [want[n][i] for i, n in enumerate(names)]
    last = list(stream(bank.forward, bank.params(params, [None] * 5), PROMPTS, GREEDY,
                       adapters=names, chunk_steps=2))[-1]
    assert driver.COMPILES["count"] == before, "changing the rows' adapters recompiled"
    assert last.result.token_ids == res.token_ids
    # a speculative method over the bank gives the same tokens
    res = generate(bank.forward, bank.params(params, names), PROMPTS,
                   dataclasses.replace(GREEDY, method="ngram"))
    assert res.token_ids == [want[n][i] for i, n in enumerate(names)]


def _same_factors(bank, i, other, j):
    """Adapter i of ``bank`` has adapter j's factors in ``other`` (the adapter axis follows
    the layer axis of scanned sites)."""
    flat = jax.tree_util.tree_flatten_with_path
    for (path, x), (_, y) in zip(flat(bank.factors)[0], flat(other.factors)[0], strict=True):
        axis = 1 if path[0].key == "layers" else 0
        np.testing.assert_allclose(np.take(np.asarray(x), i, axis), np.take(np.asarray(y), j, axis),
                                   rtol=1e-6)


def test_peft_folder_loads_as_its_cadenza_directory(bank_setup):
    d, base_cfg, _, adapters, dirs = bank_setup
    _, pm, trainable, _ = adapters["b"]
    hf = peft_export(d / "b_hf", pm, trainable)
    mixed = load_adapter_bank(base_cfg, [("hf", hf), ("ours", dirs["b"])])
    _same_factors(mixed, 0, mixed, 1)


_REF_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import IA3Config, LoraConfig, get_peft_model
    out = sys.argv[1]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=192,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      rms_norm_eps=1e-5, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(out + "/base")
    lora = LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "down_proj"],
                      init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    model.save_pretrained(out + "/lora")
    tokens = torch.tensor(np.load(out + "/tokens.npy"))
    with torch.no_grad():
        np.save(out + "/lora_logits.npy", model(input_ids=tokens).logits.numpy())
        with model.disable_adapter():
            np.save(out + "/base_logits.npy", model(input_ids=tokens).logits.numpy())
    dora = LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "up_proj"], use_dora=True,
                      init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(out + "/base"), dora).eval()
    model.save_pretrained(out + "/dora")
    with torch.no_grad():
        np.save(out + "/dora_logits.npy", model(input_ids=tokens).logits.numpy())
    ia3 = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    get_peft_model(LlamaForCausalLM(cfg), ia3).save_pretrained(out + "/ia3")
""")


@pytest.mark.skipif(not REF_PY.exists(), reason="reference env not built (make ref-env)")
def test_folders_written_by_hf_peft_match_its_logits(tmp_path):
    """LoRA and DoRA folders saved by peft itself, on a base saved by transformers: a batch
    with a base row and a row per adapter gives peft's logits for each. An (IA)3 folder is
    refused naming its type."""
    from cadenza.models import load_model

    tokens = np.asarray(jax.random.randint(jax.random.key(3), (3, 10), 0, 512), np.int64)
    np.save(tmp_path / "tokens.npy", tokens)
    (tmp_path / "ref.py").write_text(_REF_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([str(REF_PY), str(tmp_path / "ref.py"), str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    config, params = load_model(tmp_path / "base")
    bank = load_adapter_bank(tmp_path / "base", {"d": tmp_path / "dora", "p": tmp_path / "lora"},
                             base_params=params)
    assert bank.rank == 3 and {s.path[-1] for s in bank.sites} == {"q_proj", "v_proj",
                                                                   "up_proj", "down_proj"}
    logits = jax.jit(bank.forward)(bank.params(params, [None, "p", "d"]),
                                   np.asarray(tokens, np.int32))[0]
    base = np.load(tmp_path / "base_logits.npy")
    np.testing.assert_allclose(logits[0], base[0], atol=2e-4, rtol=1e-4)
    for row, name in ((1, "lora"), (2, "dora")):
        want = np.load(tmp_path / f"{name}_logits.npy")[row]
        assert np.abs(want - base[row]).max() > 1e-3
        np.testing.assert_allclose(logits[row], want, atol=2e-4, rtol=1e-4, err_msg=name)
    with pytest.raises(CadenzaError, match="peft_type: adapter 'x' is a peft 'IA3' adapter"):
        load_adapter_bank(config, {"p": tmp_path / "lora", "x": tmp_path / "ia3"})


def test_bad_banks_and_requests_are_refused_naming_the_field(bank_setup, tmp_path):
    d, base_cfg, params, adapters, dirs = bank_setup
    cases = [
        ([("a", dirs["a"]), ("a", dirs["b"])], "adapters: adapter names \\['a'\\] are given"),
        ({}, "no adapters given"),
        ({"": dirs["a"]}, "not a non-empty string"),
        ({"x": tmp_path}, "not an adapter directory"),
        ({"x": tmp_path / "missing"}, "no such adapter directory"),
    ]
    cfg, _, trainable, _ = _adapter(params, 3, "peft.method=ia3")
    cases.append(({"x": save_adapters(tmp_path / "ia3", cfg, trainable)},
                  "peft.method: adapter 'x' uses method 'ia3'"))
    wide = load_config(None, [], preset="tiny")
    wide_params = init_params(wide.model, jax.random.key(0))
    cfg, pm, trainable, _ = _adapter(wide_params, 4, "peft.method=lora", base=[])
    cases.append(({"w": save_adapters(tmp_path / "wide", cfg, trainable)},
                  "made for another base model: model.hidden_size: adapter has 64, the base "
                  "has 32"))
    cases.append(({"w": peft_export(tmp_path / "wide_hf", pm, trainable)}, "another base"))
    (tmp_path / "prefix").mkdir()
    (tmp_path / "prefix" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "PREFIX_TUNING"}))
    cases.append(({"p": tmp_path / "prefix"}, "peft_type: adapter 'p' is a peft "
                                              "'PREFIX_TUNING' adapter"))
    cases.append(({"a": dirs["a"], "c": dirs["c"]},
                  r"base_params: DoRA adapters \['c'\] need the base params"))
    for adapters_arg, message in cases:
        with pytest.raises(CadenzaError, match=message):
            load_adapter_bank(base_cfg, adapters_arg)

    assert parse_adapter_specs(["x=a=b", "y=/d"]) == [("x", "a=b"), ("y", "/d")]
    for spec in ("nodir", "=d", "x="):
        with pytest.raises(CadenzaError, match=f"--adapter: adapter '{spec}' is not NAME=DIR"):
            parse_adapter_specs([spec])
    bank = load_adapter_bank(base_cfg, {"a": dirs["a"]})
    with pytest.raises(CadenzaError, match=r"adapters\[1\]: row 1 names adapter 'zz'"):
        bank.params(params, ["a", "zz"])
    with pytest.raises(CadenzaError, match="2 adapter names for 1 prompts"):
        generate(bank.forward, bank.params(params, ["a"]), [[1]], GREEDY, adapters=["a", None])
    with pytest.raises(CadenzaError, match="adapters= needs a multi-adapter model"):
        generate(Transformer(base_cfg.model), params, [[1]], GREEDY, adapters=["a"])
