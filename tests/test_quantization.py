"""Quantised inference: weight-only int8/int4/nf4 formats, the int8 KV cache, greedy
agreement with the float model, speculative decoding over a quantised model, QLoRA
serving, quantised model directories and the CLI."""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.cli import main
from cadenza.config import load_config
from cadenza.decode import DecodeConfig, generate
from cadenza.decode.speculative import DraftModel
from cadenza.models import KVCache, Transformer, init_params, load_model, quant, save_model
from cadenza.models.cache import quantize_kv
from cadenza.models.config import DEFAULT_QUANT_TARGETS
from cadenza.pallas_kernels.attention_reference import dequantize

SMALL = ["model.num_layers=1", "model.hidden_size=64", "model.intermediate_size=128"]
N = 64
GREEDY = DecodeConfig(max_new_tokens=N, ignore_eos=True)


def _quantized(cfg, params, scheme, **fields):
    qc = dataclasses.replace(cfg, weight_quant=scheme, **fields)
    return qc, quant.quantize_params(params, qc)


def _agreement(a, b) -> float:
    """Fraction of continuations (lists of token ids) that are identical."""
    return float(np.mean([x == y for x, y in zip(a, b)]))


@pytest.mark.parametrize("shape,n_in", [((64, 4, 16), 1), ((4, 16, 64), 2)])
def test_weight_formats_round_trip_within_their_step(shape, n_in):
    @jax.jit
    def check(w, x):
        """Per-element error over the bound for int8 / int4, nf4's largest error, and the
        project-vs-dequantised-matmul difference for int8 / int4 (all must be <= 0)."""
        absmax = jnp.max(jnp.abs(w), axis=tuple(range(n_in)), keepdims=True)
        q8 = quant.quantize_kernel(w, n_in, "int8")
        q4 = quant.quantize_kernel(w, n_in, "int4", group=32)      # 64 inputs: 2 groups
        over8 = jnp.abs(quant.dequantize_kernel(q8, shape, n_in, "int8") - w) - absmax / 254
        over4 = jnp.abs(quant.dequantize_kernel(q4, shape, n_in, "int4") - w) - absmax / 14
        nf4 = quant.dequantize_kernel(quant.quantize_kernel(w, n_in, "nf4"), shape, n_in, "nf4")
        matmul = [jnp.abs(quant.project(x, q, n_in, shape[n_in:], scheme, jnp.float32)
                          - jnp.tensordot(x, quant.dequantize_kernel(q, shape, n_in, scheme),
                                          n_in)).max()
                  for scheme, q in (("int8", q8), ("int4", q4))]
        return q8, q4, over8.max(), over4.max(), jnp.abs(nf4 - w).max() / absmax.max(), matmul

    w = jax.random.normal(jax.random.key(0), shape) * jnp.linspace(0.1, 3.0, shape[-1])
    x = jax.random.normal(jax.random.key(1), (3,) + shape[:n_in])
    q8, q4, over8, over4, nf4_err, matmul = check(w, x)
    assert q8[quant.QWEIGHT].dtype == jnp.int8 and q8[quant.QWEIGHT].shape == shape
    assert q4[quant.QWEIGHT].dtype == jnp.uint8 and q4[quant.QWEIGHT].shape[0] == 64 // 2
    assert float(over8) <= 1e-6 and float(over4) <= 1e-6       # half a step: absmax/254, /14
    assert float(nf4_err) < 0.25
    assert max(float(m) for m in matmul) < 1e-4


def test_int4_pads_a_contraction_that_groups_do_not_tile():
    w = jax.random.normal(jax.random.key(0), (96, 8))            # 96 < 128: one padded group
    q = quant.quantize_kernel(w, 1, "int4", group=128)
    assert q[quant.QSCALE].shape == (1, 8) and q[quant.QWEIGHT].shape == (64, 8)
    err = np.abs(np.asarray(quant.dequantize_kernel(q, (96, 8), 1, "int4")) - np.asarray(w))
    assert np.all(err <= np.abs(np.asarray(w)).max(0) / 14 * (1 + 1e-5))


def test_kv_cache_int8_round_trip_and_bytes(tiny_config):
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16))
    codes, scale = quantize_kv(x)
    assert codes.dtype == jnp.int8 and scale.shape == (2, 5, 3)
    absmax = jnp.max(jnp.abs(x), -1, keepdims=True)
    assert bool(jnp.all(jnp.abs(dequantize(codes, scale, jnp.float32) - x)
                        <= absmax / 254 * (1 + 1e-5)))
    cfg = tiny_config("llama", "model.head_dim=128")
    size = {d: KVCache.create(cfg, 2, 32, d).nbytes for d in (jnp.float32, jnp.bfloat16, jnp.int8)}
    hd = cfg.resolved_head_dim
    assert size[jnp.int8] / size[jnp.bfloat16] == (hd + 4) / (2 * hd) <= 0.52    # halves
    assert size[jnp.int8] / size[jnp.float32] == (hd + 4) / (4 * hd) <= 0.26     # quarters


def test_tree_compaction_moves_int8_codes_with_their_scales(tiny_config):
    from cadenza.decode.verify import compact

    cfg = tiny_config()
    shape = (cfg.num_layers, 2, 6, cfg.num_kv_heads, cfg.resolved_head_dim)
    k, v = (jax.random.normal(jax.random.key(i), shape) for i in (0, 1))
    pos = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6))
    path = jnp.asarray([[0, 2, 5], [0, 1, 3]], jnp.int32)
    moved = {d: compact(KVCache.create(cfg, 2, 8, d).write(k, v, pos), path)
             for d in (None, jnp.int8)}
    q = moved[jnp.int8]
    for codes, scale, ref in ((q.k, q.k_scale, moved[None].k), (q.v, q.v_scale, moved[None].v)):
        want = dequantize(*quantize_kv(ref), jnp.float32)   # per token: move = quantise
        np.testing.assert_array_equal(dequantize(codes, scale, jnp.float32), want)
    np.testing.assert_array_equal(q.positions, moved[None].positions)


def test_random_model_int8_logits_pick_the_same_tokens():
    """A random tiny model: per-position top-1 agreement of int8 weights and of an int8
    cache with the float model (64-token greedy continuations of random models diverge at
    the first near-tie, so the trained model below checks whole continuations)."""
    cfg = load_config(None, [], preset="tiny").model
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 72), 3, cfg.vocab_size)
    qc, qp = _quantized(cfg, params, "int8")
    top1 = jax.jit(lambda c, p: jnp.argmax(Transformer(c).apply({"params": p}, tokens)[0], -1),
                   static_argnums=0)
    weights = float(jnp.mean(top1(qc, qp) == top1(cfg, params)))

    @functools.partial(jax.jit, static_argnums=0)
    def cached(dtype):   # the first 8 tokens prefilled, the other 64 read them from the cache
        cache = KVCache.create(cfg, 8, 72, dtype)
        _, _, cache = Transformer(cfg).apply({"params": params}, tokens[:, :8], cache=cache)
        logits, _, _ = Transformer(cfg).apply({"params": params}, tokens[:, 8:],
                                              cache=cache.advance(8))
        return jnp.argmax(logits, -1)

    cache = float(jnp.mean(cached("int8") == cached(None)))
    print(f"random tiny model top-1 agreement: int8 weights {weights:.3f}, int8 cache {cache:.3f}")
    assert weights >= 0.95 and cache >= 0.95


@pytest.mark.parametrize("served", ["int8", "qlora"])
def test_a_loop_over_a_quantised_model_does_not_keep_float_kernels(served):
    """Decoding runs the model in a ``lax.while_loop`` whose params are loop-invariant:
    XLA must not hoist the dequantisation out of it (a float copy of every kernel for the
    whole loop). The loop's scratch memory stays under half the float kernels' bytes, for
    int8 weights (every weight-only format passes the same ``quant.tie_to_step``) and for
    a QLoRA base served with its adapter."""
    from cadenza.train import peft

    cfg = load_config(None, ["model.num_layers=4", "peft.method=qlora"], preset="tiny")
    params = init_params(cfg.model, jax.random.key(0))
    tokens = jnp.ones((1, 4), jnp.int32)
    if served == "int8":
        qc, qp = _quantized(cfg.model, params, "int8")
        forward, args = lambda p: Transformer(qc).apply({"params": p}, tokens)[0], (qp,)
    else:
        pm, trainable, frozen = peft.prepare(cfg, params, jax.random.key(1))
        forward, args = lambda t, f: pm.apply(t, f, tokens)[0], (trainable, frozen)

    def loop(*p):
        return jax.lax.fori_loop(0, 3, lambda i, s: s + forward(*p).sum(), 0.0)

    scratch = jax.jit(loop).lower(*args).compile().memory_analysis().temp_size_in_bytes
    kernels = sum(a.nbytes for path, a in jax.tree_util.tree_leaves_with_path(params)
                  if path[-1].key == "kernel" and path[0].key != "lm_head")
    assert scratch < kernels / 2, (scratch, kernels)


@pytest.fixture(scope="module")
def trained(one_device_step):
    """A tiny model trained (60 steps) on a fixed random bigram map: ``(config, params)``."""
    config = load_config(None, SMALL + ["train.batch_size=16", "train.seq_len=72",
                                        "train.warmup_steps=0", "train.learning_rate=1e-2",
                                        "mesh.data=1"], preset="tiny")
    state, step, mesh = one_device_step(config)
    v = config.model.vocab_size
    perm = np.random.RandomState(0).permutation(v)
    shape = (16, 72)
    with jax.set_mesh(mesh):
        for i in range(60):
            toks = np.zeros((16, 73), np.int32)
            toks[:, 0] = np.random.RandomState(i).randint(0, v, 16)
            for j in range(72):
                toks[:, j + 1] = perm[toks[:, j]]
            state, _ = step(state, {}, {
                "inputs": toks[:, :-1], "targets": toks[:, 1:],
                "loss_mask": np.ones(shape, np.float32), "segment_ids": np.ones(shape, np.int32),
                "positions": np.broadcast_to(np.arange(72, dtype=np.int32), shape).copy()})
    return config.model, jax.device_get(state.params)


def test_trained_model_int8_continuations_equal_float_and_speculative_equals_greedy(trained):
    cfg, params = trained
    prompts = [list(np.random.RandomState(i).randint(3, cfg.vocab_size, 8)) for i in range(8)]
    ref = generate(Transformer(cfg), params, prompts, GREEDY).token_ids
    qc, qp = _quantized(cfg, params, "int8")
    config = dataclasses.replace(GREEDY, kv_cache="int8")
    greedy = generate(Transformer(qc), qp, prompts, config).token_ids
    agreement = _agreement(greedy, ref)
    print(f"trained tiny model: {agreement:.3f} of 64-token greedy continuations equal "
          f"(int8 weights + int8 cache)")
    assert agreement >= 0.95
    ngram = generate(Transformer(qc), qp, prompts,
                     dataclasses.replace(config, method="ngram")).token_ids
    assert ngram == greedy
    spec = generate(Transformer(qc), qp, prompts, dataclasses.replace(config, method="speculative"),
                    drafter=DraftModel(qc, 3), draft_params=(qp, None)).token_ids
    assert spec == greedy


def test_qlora_serves_its_quantised_base_like_the_training_forward():
    from cadenza.train import peft
    from cadenza.train.peft.sites import get_path

    cfg = load_config(None, SMALL + ["peft.method=qlora", "peft.quant_type=nf4"], preset="tiny")
    params = init_params(cfg.model, jax.random.key(0))
    pm, trainable, frozen = peft.prepare(cfg, params, jax.random.key(1))
    trainable = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape),
                             trainable)   # a trained-looking adapter (B is zero at init)
    for s in pm.sites:                    # served as stored: codes, no float kernel
        module = get_path(frozen["params"], s.path)
        assert "kernel" not in module
    prompt, n = [1, 7, 7, 9, 7, 7], 6
    fn = jax.jit(lambda t, f, x, i: pm.apply(t, f, x)[0][0, i])   # the training forward
    seq = list(prompt)
    for _ in range(n):
        padded = jnp.asarray([seq + [0] * (len(prompt) + n - len(seq))])
        seq.append(int(jnp.argmax(fn(trainable, frozen, padded, len(seq) - 1))))
    res = generate(pm, (trainable, frozen), [prompt],
                   dataclasses.replace(GREEDY, max_new_tokens=n))
    assert res.token_ids[0] == seq[len(prompt):]


def test_convert_quantize_writes_a_model_directory_that_generate_reads(tmp_path, capsys):
    config = load_config(None, SMALL, preset="tiny")
    params = init_params(config.model, jax.random.key(0))
    # a float directory recording targets '.*' (as older ones do): not read for quantising
    config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                   weight_quant_targets=".*"))
    src = save_model(tmp_path / "float", config, params)
    out = tmp_path / "int8"
    assert main(["convert", "quantize", "--checkpoint", str(src), "--scheme", "int8",
                 "--out", str(out)]) == 0
    assert "int8 model directory" in capsys.readouterr().out
    qconfig, qparams = load_model(out)
    assert (qconfig.model.weight_quant, qconfig.model.weight_quant_targets) == (
        "int8", DEFAULT_QUANT_TARGETS)
    q_proj = qparams["layers"]["attn"]["q_proj"]
    assert set(q_proj) == {quant.QWEIGHT, quant.QSCALE} and q_proj[quant.QWEIGHT].dtype == jnp.int8
    assert "kernel" in qparams["lm_head"]       # not targeted by default: float
    assert "kernel" not in quant.quantize_model(config, params, "int8", ".*")[1]["lm_head"]
    ids = ["--prompt-ids", "1,7,7,9", "--max-new-tokens", "5", "--ignore-eos", "--json"]
    assert main(["generate", "--checkpoint", str(out), "--kv-cache", "int8", *ids]) == 0
    from_dir = json.loads(capsys.readouterr().out)["token_ids"]
    assert main(["generate", "--checkpoint", str(src), "--quantize", "int8",
                 "--kv-cache", "int8", *ids]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == from_dir
    # wrong inputs: one line each, exit 2
    for argv, words in (
            (["generate", "--checkpoint", str(src), "--quantize-targets", "lm_head", *ids],
             "needs --quantize"),
            (["generate", "--checkpoint", str(out), "--quantize", "int4", *ids],
             "already quantised"),
            (["convert", "quantize", "--checkpoint", str(src), "--scheme", "int4",
              "--targets", "nothing", "--out", str(tmp_path / "x")], "matches no projection"),
            (["convert", "quantize", "--checkpoint", str(src), "--scheme", "int8",
              "--out", str(out)], "")):
        assert main(argv) == 2, argv
        assert words in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_moe_expert_kernels_stay_float_and_the_quantised_model_runs(tiny_config):
    cfg = dataclasses.replace(load_config(None, [], preset="tiny"),
                              model=tiny_config("qwen3_moe"))
    params = init_params(cfg.model, jax.random.key(0))
    qcfg, qp = quant.quantize_model(cfg, params, "int8")
    leaves = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(qp)}
    assert any("gate_proj']['kernel" in k and v.dtype == jnp.float32 for k, v in leaves.items())
    assert quant.count_quantized(qp) > 0
    logits = Transformer(qcfg.model).apply({"params": qp}, jnp.array([[1, 5, 7, 9]]))[0]
    assert bool(jnp.isfinite(logits).all())


# ----- cadenza's quantised paths against plain-jnp fake quantisation -------------------------

def _fake_int8(w, n_in):
    """Per output channel: absmax over the contracted dims / 127."""
    s = np.abs(w).max(axis=tuple(range(n_in)), keepdims=True) / 127
    return np.round(w / s) * s


def _fake_int4(w, n_in, group):
    """Symmetric groups of ``group`` consecutive inputs (C order) per output channel."""
    g = w.reshape((-1, group) + w.shape[n_in:])
    s = np.abs(g).max(axis=1, keepdims=True) / 7
    return (np.round(g / s) * s).reshape(w.shape)


def _fake_nf4(w, n_in):
    """Blocks of 64 of the flattened kernel, each value to the nearest NF4 level times the
    block's absmax."""
    levels = quant.nf4_levels()
    b = w.reshape(-1, 64)
    a = np.abs(b).max(1, keepdims=True)
    return (levels[np.abs(b[..., None] / a[..., None] - levels).argmin(-1)] * a).reshape(w.shape)


def _fake_kv(x):
    """Per token and head: absmax over head_dim / 127."""
    s = jnp.max(jnp.abs(x), -1, keepdims=True) / 127
    return jnp.round(x / s) * s


def _plain_forward(cfg, p, tokens, kv=lambda x: x):
    """A plain-jnp Llama forward of the tiny preset (no cache): logits [B, T, vocab];
    ``kv`` maps the keys/values (after RoPE) of every layer."""
    def rms(x, w):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w

    t, d = tokens.shape[1], cfg.resolved_head_dim
    angles = jnp.arange(t)[:, None] / cfg.rope_theta ** (jnp.arange(0, d, 2) / d)
    cos, sin = (f(jnp.concatenate([angles, angles], -1))[:, None] for f in (jnp.cos, jnp.sin))

    def rope(x):
        return x * cos + jnp.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1) * sin

    x, lay = p["embed"]["embedding"][tokens], p["layers"]
    for i in range(cfg.num_layers):
        a, m = (jax.tree.map(lambda w: w[i], lay[n]) for n in ("attn", "mlp"))
        h = rms(x, lay["attn_norm"]["scale"][i])
        q, k, v = (jnp.einsum("btd,dhk->bthk", h, a[n]["kernel"]) for n in ("q_proj", "k_proj",
                                                                            "v_proj"))
        k, v = (jnp.repeat(kv(y), cfg.num_heads // cfg.num_kv_heads, 2) for y in (rope(k), v))
        s = jnp.einsum("bqhk,bshk->bhqs", rope(q), k) / math.sqrt(d)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
        o = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(s, -1), v)
        x = x + jnp.einsum("bqhk,hkd->bqd", o, a["o_proj"]["kernel"])
        h = rms(x, lay["mlp_norm"]["scale"][i])
        x = x + (jax.nn.silu(h @ m["gate_proj"]["kernel"]) * (h @ m["up_proj"]["kernel"])
                 ) @ m["down_proj"]["kernel"]
    return rms(x, p["final_norm"]["scale"]) @ p["lm_head"]["kernel"]


def test_quantised_paths_equal_plain_jnp_fake_quantisation(tiny_config):
    """int8 / int4 / nf4 weights and the int8 KV cache: cadenza's logits equal those of the
    float model run with independently fake-quantised weights (every projection, lm_head
    included) or keys/values, up to float rounding, while differing from the float model's.
    Scales on the wrong axis, another group layout or a cache quantised over another axis
    fail this."""
    cfg = tiny_config()
    params = jax.device_get(init_params(cfg, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 3, cfg.vocab_size)
    fake = {"int8": _fake_int8, "int4": functools.partial(_fake_int4, group=32),
            "nf4": _fake_nf4}
    plain = jax.jit(functools.partial(_plain_forward, cfg), static_argnames="kv")
    forward = jax.jit(lambda c, p, cache: Transformer(c).apply({"params": p}, tokens,
                                                               cache=cache)[0],
                      static_argnums=0)
    float_logits = plain(params, tokens)
    n_in = {"o_proj": 2}
    for scheme, fq in fake.items():
        qc, qp = _quantized(cfg, params, scheme, weight_quant_targets=".*",
                            weight_quant_group=32)
        ours = forward(qc, qp, None)
        ref = plain(jax.tree_util.tree_map_with_path(
            lambda path, w: np.stack([fq(x, n_in.get(path[-2].key, 1)) for x in w])
            if path[-1].key == "kernel" and w.ndim > 2 else
            fq(w, 1) if path[-1].key == "kernel" else w, params), tokens)
        effect, error = (float(jnp.abs(a - b).max()) for a, b in ((ref, float_logits),
                                                                   (ours, ref)))
        assert error < 1e-4 and effect > 100 * error, (scheme, effect, error)
    cache = KVCache.create(cfg, *tokens.shape, jnp.int8)   # each token reads int8 keys/values
    ours = forward(cfg, params, cache)
    ref = plain(params, tokens, kv=_fake_kv)
    effect, error = (float(jnp.abs(a - b).max()) for a, b in ((ref, float_logits), (ours, ref)))
    assert error < 1e-4 and effect > 100 * error, ("kv8", effect, error)


def test_float_models_do_not_differ_by_quantisation_targets():
    """Directories saved before lm_head left the default targets record '.*': as float
    models they still load as train.init_from / merge inputs / resumes of this config,
    and export to Hugging Face."""
    import dataclasses

    from cadenza.config import load_config
    from cadenza.models.hf_config import hf_config_from_model
    from cadenza.train.checkpoints import model_differences

    model = load_config(None, [], preset="tiny").model
    old = dataclasses.replace(model, weight_quant_targets=".*")
    assert model_differences(old, model) == []
    assert hf_config_from_model(old) == hf_config_from_model(model)  # exports as before
    int8 = dataclasses.replace(model, weight_quant="int8")
    diffs = model_differences(dataclasses.replace(int8, weight_quant_targets=".*"), int8)
    assert len(diffs) == 1 and diffs[0].startswith("model.weight_quant_targets:")
