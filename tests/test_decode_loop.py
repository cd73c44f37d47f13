"""The generate loop: exactness against a cache-free reference, ragged batches, seeds,
stops, streaming, proxy-tuning and bad input."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.decode import DecodeConfig, ProxyTuning, SamplingConfig, generate, stream
from cadenza.decode.config import ProxyConfig
from cadenza.errors import CadenzaError
from cadenza.models import Transformer, init_params

PROMPTS = [[1, 17, 42, 99, 5], [1, 300], [1, 7, 7, 7, 200, 201, 202, 31, 64]]
N = 8


class CharTokenizer:
    """Stand-in tokenizer: ids 3..258 are single bytes (as Latin-1 characters), ids 259..
    are two-character pieces over "ab\\n ", so the same text has several tokenizations."""

    PIECES = [x + y for x in "ab\n " for y in "ab\n "]
    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 512

    def encode(self, text, *, add_bos=True):
        return ([self.bos_id] if add_bos else []) + [3 + b for b in text.encode("latin-1")]

    def decode(self, ids):
        out = []
        for i in ids:
            if 3 <= i < 259:
                out.append(chr(i - 3))
            elif i >= 259:
                out.append(self.PIECES[(i - 259) % len(self.PIECES)])
        return "".join(out)


_MODELS = {}


def cached_model(tiny_config, family, seed, *overrides):
    """(Transformer, sharpened params) for a tiny ``family`` model, built once per session."""
    key = (family, seed, overrides)
    if key not in _MODELS:
        cfg = tiny_config(family, *overrides)
        _MODELS[key] = Transformer(cfg), sharpen(init_params(cfg, jax.random.key(seed)))
    return _MODELS[key]


def sharpen(params, scale=40.0):
    """Scale the output projection so random-model logits have clear winners (no near-ties)."""
    if "lm_head" in params:
        return {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * scale}}
    return {**params, "embed": {"embedding": params["embed"]["embedding"] * scale ** 0.5}}


@pytest.fixture
def base(tiny_config):
    return cached_model(tiny_config, "llama", 0)


def reference_decode(logits_fn, prompt, n, penalty=1.0, with_logprobs=False):
    """Greedy decoding by re-running the full sequence each step (no KV cache)."""
    seq = list(prompt)
    out, logprobs = [], []
    for _ in range(n):
        z = np.asarray(logits_fn(seq), np.float64)
        if penalty != 1.0:
            seen = list(set(seq))
            z[seen] = np.where(z[seen] > 0, z[seen] / penalty, z[seen] * penalty)
        tok = int(np.argmax(z))
        out.append(tok)
        logprobs.append(z[tok] - z.max() - np.log(np.exp(z - z.max()).sum()))
        seq.append(tok)
    return (out, logprobs) if with_logprobs else out


_FORWARD = {}


def full_logits_fn(model, params, width=32):
    """Last-position logits of a right-padded sequence from one cache-free forward pass."""
    if model.config not in _FORWARD:
        _FORWARD[model.config] = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
    fwd = _FORWARD[model.config]

    def fn(seq):
        t = np.zeros((1, width), np.int32)
        t[0, :len(seq)] = seq
        return fwd(params, jnp.asarray(t))[0, len(seq) - 1]
    return fn


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_matches_cache_free_reference(base, penalty):
    model, params = base
    res = generate(model, params, PROMPTS,
                   DecodeConfig(max_new_tokens=N, ignore_eos=True,
                                sampling=SamplingConfig(repetition_penalty=penalty)))
    fn = full_logits_fn(model, params)
    for prompt, ids, lps in zip(PROMPTS, res.token_ids, res.logprobs):
        ref_ids, ref_lps = reference_decode(fn, prompt, N, penalty, with_logprobs=True)
        assert ids == ref_ids
        np.testing.assert_allclose(lps, ref_lps, atol=1e-3)
    assert res.finish_reasons == ["length"] * 3
    assert res.stats["steps"] == N - 1 and res.stats["generated_tokens"] == 3 * N
    assert res.stats["decode_tokens_per_s"] > 0 and res.stats["prefill_s"] > 0


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_windowed_and_softcapped_families_match_reference(tiny_config, family):
    model, params = cached_model(tiny_config, family, 1)
    res = generate(model, params, PROMPTS, DecodeConfig(max_new_tokens=N, ignore_eos=True))
    fn = full_logits_fn(model, params)
    for prompt, ids in zip(PROMPTS, res.token_ids):
        assert ids == reference_decode(fn, prompt, N)


def test_ragged_batch_equals_each_prompt_alone(base):
    model, params = base
    cfg = DecodeConfig(max_new_tokens=N, method="sample", ignore_eos=True,
                       sampling=SamplingConfig(temperature=0.8, top_k=50))
    seeds = [11, 22, 33]
    batch = generate(model, params, PROMPTS, cfg, seeds=seeds)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, params, [prompt], cfg, seeds=[seeds[i]])
        assert alone.token_ids[0] == batch.token_ids[i]
        np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[i], atol=1e-4)


def test_fixed_seed_reproducible_and_seed_matters(base):
    model, params = base
    cfg = DecodeConfig(max_new_tokens=N, method="sample", ignore_eos=True,
                       sampling=SamplingConfig(temperature=0.8, top_k=50))
    a = generate(model, params, PROMPTS, cfg, seeds=[1, 2, 3])
    b = generate(model, params, PROMPTS, cfg, seeds=[1, 2, 3])
    c = generate(model, params, PROMPTS, cfg, seeds=[4, 5, 6])
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    assert a.token_ids != c.token_ids


def test_stop_token_ends_row_and_others_continue(base):
    model, params = base
    full = generate(model, params, PROMPTS, DecodeConfig(max_new_tokens=N, ignore_eos=True))
    stop = full.token_ids[0][2]
    res = generate(model, params, PROMPTS,
                   DecodeConfig(max_new_tokens=N, ignore_eos=True, stop_token_ids=[stop]))
    for full_ids, ids, reason in zip(full.token_ids, res.token_ids, res.finish_reasons):
        cut = full_ids.index(stop) + 1 if stop in full_ids else N
        assert ids == full_ids[:cut]
        assert reason == ("stop_token" if stop in full_ids else "length")
    assert res.finish_reasons[0] == "stop_token" and len(res.token_ids[0]) == 3


def test_stop_strings_cut_text_and_tokens(base):
    model, params = base
    tok = CharTokenizer()
    texts = ["ab", "a\nb", "hello"]
    full = generate(model, params, texts, DecodeConfig(max_new_tokens=N, ignore_eos=True),
                    tokenizer=tok)
    target = full.text[0]
    stop = target[5:8]              # some three characters in the middle of row 0's text
    res = generate(model, params, texts, DecodeConfig(max_new_tokens=N, ignore_eos=True,
                                                      stop=[stop], chunk_steps=3),
                   tokenizer=tok)
    for ids_full, text_full, ids, text, reason in zip(full.token_ids, full.text, res.token_ids,
                                                      res.text, res.finish_reasons):
        if stop not in text_full:
            assert (ids, text, reason) == (ids_full, text_full, "length")
            continue
        assert reason == "stop_string"
        assert text == text_full[:text_full.index(stop)]
        n = next(n for n in range(1, len(ids_full) + 1) if stop in tok.decode(ids_full[:n]))
        assert ids == ids_full[:n]
    assert res.finish_reasons[0] == "stop_string"


def test_stream_equals_generate(base):
    model, params = base
    tok = CharTokenizer()
    texts = ["ab", "a\nb", "hello"]
    cfg = DecodeConfig(max_new_tokens=N, ignore_eos=True)
    whole = generate(model, params, texts, cfg, tokenizer=tok)
    stop = whole.text[1][4:6]
    for c in (cfg, DecodeConfig(max_new_tokens=N, ignore_eos=True, stop=[stop])):
        ref = generate(model, params, texts, c, tokenizer=tok)
        chunks = list(stream(model, params, texts, c, tokenizer=tok, chunk_steps=3))
        assert chunks[-1].result is not None and all(ch.result is None for ch in chunks[:-1])
        assert [ch.step for ch in chunks[:-1]] == [1, 4, 7][:len(chunks) - 1]
        for r in range(3):
            assert sum((ch.token_ids[r] for ch in chunks), []) == ref.token_ids[r]
            assert "".join(ch.text[r] for ch in chunks) == ref.text[r]
        assert chunks[-1].result.token_ids == ref.token_ids
        assert chunks[-1].result.logprobs == ref.logprobs


def test_proxy_tuning_neutral_cases_equal_base(base, tiny_config):
    model, params = base
    small, expert = cached_model(tiny_config, "llama", 5, "model.hidden_size=32",
                                 "model.num_layers=1")
    _, anti = cached_model(tiny_config, "llama", 6, "model.hidden_size=32", "model.num_layers=1")
    cfg = DecodeConfig(max_new_tokens=N, ignore_eos=True)
    plain = generate(model, params, PROMPTS, cfg)
    zero = generate(model, params, PROMPTS, DecodeConfig(max_new_tokens=N, ignore_eos=True,
                                                         proxy=ProxyConfig(alpha=0.0)),
                    proxy=ProxyTuning(small, expert, small, anti))
    same = generate(model, params, PROMPTS, cfg, proxy=ProxyTuning(small, expert, small, expert))
    assert zero.token_ids == plain.token_ids and same.token_ids == plain.token_ids

    tuned = generate(model, params, PROMPTS, cfg, proxy=ProxyTuning(small, expert, small, anti))
    fb, fe, fa = (full_logits_fn(model, params), full_logits_fn(small, expert),
                  full_logits_fn(small, anti))
    combined = lambda s: np.asarray(fb(s)) + np.asarray(fe(s)) - np.asarray(fa(s))  # noqa: E731
    for prompt, ids in zip(PROMPTS, tuned.token_ids):
        assert ids == reference_decode(combined, prompt, N)
    assert tuned.token_ids != plain.token_ids


def test_proxy_vocab_mismatch_fails_before_compiling(base, tiny_config):
    model, params = base
    other = tiny_config("llama", "model.vocab_size=256")
    with pytest.raises(CadenzaError, match="vocabulary"):
        generate(model, params, PROMPTS, DecodeConfig(),
                 proxy=ProxyTuning(Transformer(other), {}, Transformer(other), {}))


def test_eos_default_and_max_new_tokens_one(base):
    model, params = base
    first = generate(model, params, PROMPTS, DecodeConfig(max_new_tokens=1))
    assert [len(t) for t in first.token_ids] == [1, 1, 1] and first.stats["steps"] == 0
    full = generate(model, params, PROMPTS, DecodeConfig(max_new_tokens=N, ignore_eos=True))
    # the tokenizer's EOS id (set to row 0's first token) stops row 0 at once
    tok = CharTokenizer()
    tok.eos_id = first.token_ids[0][0]
    res = generate(model, params, PROMPTS, DecodeConfig(max_new_tokens=N), tokenizer=tok)
    assert res.token_ids[0] == first.token_ids[0] and res.finish_reasons[0] == "stop_token"
    assert res.text[0] == ""
    for r in (1, 2):
        eos_at = full.token_ids[r].index(tok.eos_id) + 1 if tok.eos_id in full.token_ids[r] else N
        assert res.token_ids[r] == full.token_ids[r][:eos_at]


@pytest.mark.parametrize("prompts, cfg, match", [
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([], {}, "no prompts"),
    ("hello", {}, "list"),
    (["text"], {}, "no tokenizer"),
    ([[1, 600]], {}, "outside the vocabulary"),
    ([[1] * 20], {"max_len": 16, "max_new_tokens": 4}, "cache slots"),
    ([[1] * 1020], {"max_new_tokens": 8}, "max_position_embeddings"),
    ([[1, 2]], {"sampling": SamplingConfig(top_k=513), "method": "sample"}, "top_k"),
    ([[1, 2]], {"stop": ["x"]}, "need a tokenizer"),
    ([[1, 2]], {"stop_token_ids": [999]}, "stop token ids"),
])
def test_bad_input_fails_clearly(base, prompts, cfg, match):
    model, params = base
    with pytest.raises(CadenzaError, match=match):
        generate(model, params, prompts, DecodeConfig(**cfg))


def test_tensor_parallel_params_give_same_tokens(base):
    from cadenza.models import param_shardings
    from cadenza.train.config import MeshConfig
    from cadenza.train.mesh import make_mesh

    model, params = base
    mesh_cfg = MeshConfig(data=1, tensor=2)
    mesh = make_mesh(mesh_cfg, devices=jax.devices()[:2])
    sharded = jax.device_put(params, param_shardings(model.config, mesh, mesh_cfg.rules()))
    cfg = DecodeConfig(max_new_tokens=N, ignore_eos=True)
    res = generate(model, sharded, PROMPTS, cfg, mesh=mesh, rules=mesh_cfg.rules())
    assert res.token_ids == generate(model, params, PROMPTS, cfg).token_ids
