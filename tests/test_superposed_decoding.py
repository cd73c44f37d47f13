"""Superposed Decoding: the step against a NumPy port of the reference, and the model loop."""

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.decode import DecodeConfig, generate, ngram_table
from cadenza.decode import superposed as sp
from cadenza.decode.config import SuperposedConfig
from cadenza.errors import CadenzaError
from cadenza.models import KVCache, Transformer, init_params

NEG = np.float32(1e7)  # the reference's INF
scores_fn = jax.jit(sp.candidate_scores, static_argnames=("config",))
step_fn = jax.jit(sp.superposed_step, static_argnames=("config", "eos_id"))


def brute_counts(docs, max_order):
    ctx, pair = Counter(), Counter()
    for doc in docs:
        doc = [int(t) for t in doc]
        for n in range(2, max_order + 1):
            for i in range(len(doc) - n + 1):
                c = tuple(doc[i:i + n - 1])
                ctx[c] += 1
                pair[(c, doc[i + n - 1])] += 1
    return ctx, pair


def _top(x, n):
    """Indices of the n largest (ties: lower index first), as torch/XLA top-k."""
    return np.argsort(-x, kind="stable")[:n]


def _ftz(x):
    """Flush float32 denormals to zero, as XLA does on CPU (matters at temperature 0.06)."""
    return np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0), x)


def _softmax(x):
    e = _ftz(np.exp(x - x.max()))
    return _ftz(e / e.sum())


def ref_log_probs(logits, prefix_rows, pos, counts, cfg):
    """Reference steps 1-3 over the whole vocabulary for one prompt: lp [k, V] float32."""
    ctx, pair = counts
    probs = _softmax((logits / np.float32(cfg.temperature)).astype(np.float32))
    keep = np.zeros_like(probs)
    top = _top(probs, cfg.num_candidates)
    keep[top] = probs[top]
    keep = _ftz(keep / keep.sum())
    k, v = prefix_rows.shape[0], logits.shape[0]
    with np.errstate(divide="ignore"):
        llm = np.log(keep).astype(np.float32)
        if cfg.alpha == 0:
            return np.broadcast_to(llm, (k, v)).copy()
        g = np.zeros((k, v), np.float32)
        for d in range(k):
            for tok in np.flatnonzero(keep):
                for j, lam in enumerate(cfg.ngram_weights, start=1):
                    c = tuple(int(t) for t in prefix_rows[d, pos - j:pos])
                    if j <= pos and ctx[c]:
                        g[d, tok] += np.float32(lam) * np.float32(pair[(c, int(tok))] / ctx[c])
        a = np.float32(cfg.alpha)
        lp = (1 - a) * llm + a * np.log(g)
    all_inf = np.all(lp == -np.inf, axis=-1, keepdims=True)
    return np.where(all_inf, (1 - a) * llm - np.float32(cfg.penalty), lp).astype(np.float32)


def ref_step(st, logits, counts, cfg, eos, step):
    """One reference step per prompt: st holds per-prompt dicts of numpy arrays.

    ``seq`` [k, S] prompt + generated tokens at absolute positions; ``lp`` [k];
    ``fin_seq``, ``fin_lp``, ``fin_len``; ``pos`` absolute position generated now.
    The finished pool is ported faithfully (non-EOS candidates enter it at
    score - 1e7); callers compare only its entries above -5e6.
    """
    k = cfg.num_drafts
    out = []
    for b, s in enumerate(st):
        lp = ref_log_probs(logits[b], s["seq"], s["pos"], counts, cfg)
        v = lp.shape[1]
        if step == 0:
            idx = _top(lp[0], 2 * k)
            beam, tok, score = np.zeros(2 * k, int), idx, s["lp"][0] + lp[0][idx]
        else:
            flat = (s["lp"][:, None] + lp).reshape(-1)
            idx = _top(flat, 2 * k)
            beam, tok, score = idx // v, idx % v, flat[idx]
        seqs = s["seq"][beam].copy()
        seqs[:, s["pos"]] = tok
        fin = tok == eos
        alive_vals = (score + fin * -NEG).astype(np.float32)
        keep = _top(alive_vals, k)
        pool = np.concatenate([s["fin_lp"], (score + ~fin * -NEG).astype(np.float32)])
        fkeep = _top(pool, k)
        lens = np.concatenate([s["fin_len"], np.full(2 * k, step + 1)])
        out.append(dict(seq=seqs[keep], lp=alive_vals[keep], pos=s["pos"] + 1,
                        fin_seq=np.concatenate([s["fin_seq"], seqs])[fkeep], fin_lp=pool[fkeep],
                        fin_len=lens[fkeep]))
    return out


def _sorted_entries(seqs, scores, lengths, lo):
    """(score, tokens) of entries with score > lo, best first."""
    rows = [(float(sc), tuple(int(t) for t in sq[:ln])) for sq, sc, ln in
            zip(seqs, scores, lengths) if sc > lo]
    return sorted(rows, key=lambda r: -r[0])


def _assert_same(got, want):
    assert [t for _, t in got] == [t for _, t in want]
    np.testing.assert_allclose([s for s, _ in got], [s for s, _ in want], rtol=2e-6, atol=1e-4)


V = 50
EOS = 7


@pytest.fixture(scope="module")
def markov_table(tmp_path_factory):
    """A sparse Markov corpus over tokens 0..39 (40..49 never occur) and its device table."""
    rng = np.random.default_rng(0)
    succ = rng.integers(0, 40, size=(40, 4))
    docs = []
    for _ in range(60):
        doc = [int(rng.integers(0, 40))]
        for _ in range(int(rng.integers(5, 30))):
            doc.append(int(succ[doc[-1], rng.integers(0, 4)]))
        docs.append(doc)
    out = tmp_path_factory.mktemp("markov")
    ngram_table.build_ngram_table(docs, out, vocab_size=V, max_order=6)
    return ngram_table.load_ngram_table(out).to_device(), brute_counts(docs, 6), succ


@pytest.mark.parametrize("temperature", [1.0, 0.06])
def test_step_matches_numpy_port_of_reference(markov_table, temperature):
    table, counts, succ = markov_table
    cfg = SuperposedConfig(temperature=temperature)
    k, n = cfg.num_drafts, 7
    prompts = [[3, int(succ[3, 0]), int(succ[succ[3, 0], 1])], [5, 9, 11, 2, 45]]
    width = max(map(len, prompts))
    toks = np.zeros((2, width), np.int32)
    for i, p in enumerate(prompts):
        toks[i, :len(p)] = p
    state = sp.init_state(jnp.asarray(toks), jnp.asarray([3, 5]), cfg, n)
    ref = []
    for p in prompts:
        seq = np.zeros((k, len(p) + n), np.int64)
        seq[:, :len(p)] = p
        ref.append(dict(seq=seq, lp=np.zeros(k, np.float32), pos=len(p),
                        fin_seq=seq.copy(), fin_lp=np.full(k, -np.inf, np.float32),
                        fin_len=np.zeros(k, int)))
    rng = np.random.default_rng(1)
    penalised = 0
    for t in range(n):
        logits = rng.normal(size=(2, V)).astype(np.float32) * 3
        logits[:, 40:] -= 2.0
        if t in (1, 3):
            logits[:, EOS] += 6.0  # EOS among the best candidates: drafts finish
        if temperature == 1.0:
            penalised += sum(np.sum(ref_log_probs(logits[b], ref[b]["seq"], ref[b]["pos"],
                                                  counts, cfg) < -cfg.penalty / 2) for b in (0, 1))
        state, last, w = step_fn(state, jnp.asarray(logits), table, cfg, EOS)
        ref = ref_step(ref, logits, counts, cfg, EOS, t)
        for b in range(2):
            p = len(prompts[b])
            got = _sorted_entries(np.asarray(state.alive_tokens[b]),
                                  np.asarray(state.alive_scores[b]), [t + 1] * k, -np.inf)
            want = _sorted_entries(ref[b]["seq"][:, p:], ref[b]["lp"], [t + 1] * k, -np.inf)
            _assert_same(got, want)
            got = _sorted_entries(np.asarray(state.fin_tokens[b]),
                                  np.asarray(state.fin_scores[b]),
                                  np.asarray(state.fin_lengths[b]), -NEG / 2)
            want = _sorted_entries(ref[b]["fin_seq"][:, p:], ref[b]["fin_lp"], ref[b]["fin_len"],
                                   -NEG / 2)
            _assert_same(got, want)
            # Mixing weights: the reference's normalised V-sized row, compared per token.
            ref_w = _softmax(ref[b]["lp"] + ref[b]["lp"].max())
            mix_ref, mix = np.zeros(V), np.zeros(V)
            np.add.at(mix_ref, ref[b]["seq"][:, p + t], ref_w)
            np.add.at(mix, np.asarray(last[b]), np.asarray(w[b]))
            np.testing.assert_allclose(mix, mix_ref, rtol=1e-4, atol=1e-6)
    assert np.asarray(state.fin_scores > -np.inf).any()  # the finished pool was exercised
    if temperature == 1.0:
        assert penalised > 0  # prompt 1 ends in an unseen token: the penalty path ran


def test_first_step_gives_top_distinct_tokens():
    cfg = SuperposedConfig(alpha=0.0, temperature=0.5)
    logits = jax.random.normal(jax.random.key(0), (3, V)) * 2
    state = sp.init_state(jnp.ones((3, 2), jnp.int32), jnp.full((3,), 2), cfg, 4)
    new, last, w = step_fn(state, logits, None, cfg, None)
    probs = np.asarray(jax.nn.softmax(logits / 0.5))
    for b in range(3):
        top = np.argsort(-probs[b])
        np.testing.assert_array_equal(np.asarray(last[b]), top[:3])
        renorm = probs[b][top[:3]] / probs[b][top[:9]].sum()
        np.testing.assert_allclose(np.asarray(new.alive_scores[b]), np.log(renorm), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(w[b]), renorm / renorm.sum(), rtol=1e-5)


def test_weights_sum_to_one_and_mix_embeddings():
    scores = jnp.asarray([[-1.0, -3.0, -jnp.inf], [-2.0, -2.0 - 1e7, -0.5]])
    w = sp.superposition_weights(scores)
    np.testing.assert_allclose(np.asarray(w.sum(-1)), 1.0, rtol=1e-6)
    assert float(w[0, 2]) == 0.0
    table = jax.random.normal(jax.random.key(1), (V, 16))
    tokens = jnp.asarray([[4, 4, 4], [1, 2, 1]])
    rows = table[tokens]
    e = sp.superpose_embeddings(rows, w)
    np.testing.assert_allclose(np.asarray(e[0]), np.asarray(table[4]), rtol=1e-6, atol=1e-7)
    mix = np.zeros((2, V))  # the reference's V-sized mixing matrix times E
    np.add.at(mix, (np.repeat([0, 1], 3), np.asarray(tokens).ravel()), np.asarray(w).ravel())
    np.testing.assert_allclose(np.asarray(e), mix @ np.asarray(table), rtol=1e-5, atol=1e-6)


def test_empty_table_hits_penalty(tmp_path):
    ngram_table.build_ngram_table([], tmp_path, vocab_size=V, max_order=6)
    table = ngram_table.load_ngram_table(tmp_path).to_device()
    cfg = SuperposedConfig(temperature=1.0)
    logits = jax.random.normal(jax.random.key(2), (2, V))
    state = sp.init_state(jnp.ones((2, 6), jnp.int32) * 3, jnp.full((2,), 6), cfg, 32)
    _, s = scores_fn(logits, state, table, cfg)
    top_p = jax.lax.top_k(jax.nn.softmax(logits), 9)[0]
    logp = np.log(np.asarray(top_p / top_p.sum(-1, keepdims=True)))
    np.testing.assert_allclose(np.asarray(s), np.broadcast_to(
        ((1 - 0.54) * logp - 200.0)[:, None], s.shape), rtol=1e-6)


def test_alpha_zero_means_ngram_off(markov_table):
    table, _, _ = markov_table
    cfg = SuperposedConfig(alpha=0.0, temperature=1.0)
    logits = jax.random.normal(jax.random.key(3), (2, V))
    state = sp.init_state(jnp.full((2, 2), 45, jnp.int32), jnp.full((2,), 2), cfg, 32)
    ids, s = scores_fn(logits, state, table, cfg)
    top_p = jax.lax.top_k(jax.nn.softmax(logits), 9)[0]
    want = np.log(np.asarray(top_p / top_p.sum(-1, keepdims=True)))
    np.testing.assert_allclose(np.asarray(s[:, 1]), want, rtol=1e-6)
    assert np.isfinite(np.asarray(s)).all()


def test_permuting_drafts_permutes_outputs(markov_table):
    table, _, succ = markov_table
    cfg = SuperposedConfig(temperature=1.0)
    rng = np.random.default_rng(4)
    state = sp.init_state(jnp.asarray([[1, 2, 3, 4, 5]]), jnp.asarray([5]), cfg, 4)
    hist = np.stack([[int(succ[i, 0]), 3, 5, int(succ[i, 1]), int(succ[succ[i, 1], 2])]
                     for i in (2, 6, 8)])[None]
    state = state.replace(history=jnp.asarray(hist, jnp.int32),
                          alive_scores=jnp.asarray([[-1.0, -1.5, -2.5]]),
                          alive_tokens=jnp.asarray(rng.integers(0, 40, (1, 3, 4)), jnp.int32),
                          step=jnp.asarray(2, jnp.int32))
    perm = np.array([2, 0, 1])
    permuted = jax.tree.map(lambda x: x[:, perm] if x.ndim >= 2 else x, state)
    logits = jnp.asarray(rng.normal(size=(1, V)) * 3, jnp.float32)
    _, s = scores_fn(logits, state, table, cfg)
    _, s_perm = scores_fn(logits, permuted, table, cfg)
    np.testing.assert_array_equal(np.asarray(s_perm), np.asarray(s)[:, perm])
    a, last_a, w_a = step_fn(state, logits, table, cfg, EOS)
    b, last_b, w_b = step_fn(permuted, logits, table, cfg, EOS)
    entries = [_sorted_entries(np.asarray(x.alive_tokens[0]), np.asarray(x.alive_scores[0]),
                               [3] * 3, -np.inf) for x in (a, b)]
    _assert_same(*entries)
    embed = jax.random.normal(jax.random.key(5), (V, 8))
    np.testing.assert_allclose(np.asarray(sp.superpose_embeddings(embed[last_a], w_a)),
                               np.asarray(sp.superpose_embeddings(embed[last_b], w_b)),
                               rtol=1e-6)


# --- with the model --------------------------------------------------------------------------

def _ragged(prompts):
    width = max(map(len, prompts))
    toks = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        toks[i, :len(p)] = p
    return jnp.asarray(toks), jnp.asarray([len(p) for p in prompts], jnp.int32)


def _prefill(model, params, toks, lens, n):
    cache = KVCache.create(model.config, toks.shape[0], toks.shape[1] + n)
    logits, _, cache = model.apply({"params": params}, toks, cache=cache)
    last = jnp.take_along_axis(logits, (lens - 1)[:, None, None], axis=1)[:, 0]
    return last, cache.with_lengths(lens)


class _Tok:
    eos_id = None

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_k1_alpha0_c1_is_bit_identical_to_greedy(tiny_config):
    cfg = tiny_config("gemma")  # scaled embeddings: the superposed input must not be rescaled
    model = Transformer(cfg)
    params = init_params(cfg, jax.random.key(0))
    n = 10
    prompts = [[1, 17, 300, 42, 8], [1, 99]]
    toks, lens = _ragged(prompts)

    @jax.jit
    def greedy(params, toks, lens):
        logits, cache = _prefill(model, params, toks, lens, n)
        out = jnp.zeros((toks.shape[0], n), jnp.int32).at[:, 0].set(jnp.argmax(logits, -1))

        def body(i, carry):
            out, cache = carry
            logits, _, cache = model.apply({"params": params},
                                           jax.lax.dynamic_slice_in_dim(out, i - 1, 1, 1),
                                           cache=cache)
            return out.at[:, i].set(jnp.argmax(logits[:, 0], -1)), cache.advance(1)

        return jax.lax.fori_loop(1, n, body, (out, cache))[0]

    want = np.asarray(greedy(params, toks, lens))
    config = DecodeConfig(method="superposed", max_new_tokens=n, superposed=SuperposedConfig(
        num_drafts=1, num_candidates=1, alpha=0.0))
    tok = _Tok()
    tok.eos_id = eos = cfg.eos_token_id
    res = generate(model, params, prompts, config, tokenizer=tok)
    out = res.extras
    np.testing.assert_array_equal(out["tokens"][:, 0], want)
    assert res.token_ids == want.tolist()
    np.testing.assert_array_equal(out["scores"][:, 0], -1e7 * (want == eos).sum(-1))
    assert not out["finished"].any() and np.all(out["lengths"] == n)
    assert out["texts"] == [[tok.decode(sp._until_eos(want[b], eos))] for b in range(2)]


def test_generate_validates_before_compiling(tiny_config):
    cfg = tiny_config("llama")
    model = Transformer(cfg)
    off = DecodeConfig(method="superposed", superposed=SuperposedConfig(alpha=0.0))
    with pytest.raises(CadenzaError, match="n-gram table"):
        generate(model, {}, [[1, 2]], DecodeConfig(method="superposed"))
    with pytest.raises(CadenzaError, match="empty"):
        generate(model, {}, [[]], off)
    with pytest.raises(CadenzaError, match="max_position_embeddings"):
        generate(model, {}, [[1] * 1000], DecodeConfig(
            method="superposed", max_new_tokens=100, superposed=SuperposedConfig(alpha=0.0)))
    with pytest.raises(CadenzaError, match="cannot stream"):
        generate(model, {}, [[1, 2]], DecodeConfig(
            method="superposed", stop=["x"], superposed=SuperposedConfig(alpha=0.0)),
            tokenizer=_Tok())
    with pytest.raises(CadenzaError, match="alpha"):
        SuperposedConfig(alpha=1.0)


def test_drafts_are_distinct_valid_and_scored_as_described(tiny_config, tmp_path):
    cfg = tiny_config("llama")
    model = Transformer(cfg)
    params = init_params(cfg, jax.random.key(1))
    config = SuperposedConfig(temperature=1.0)
    k, c, n = config.num_drafts, config.num_candidates, 6
    prompts = [[1, 20, 30, 40, 50, 60, 70], [1, 5]]
    toks, lens = _ragged(prompts)
    logits0, cache = jax.jit(_prefill, static_argnums=(0, 4))(model, params, toks, lens, n)
    top0 = np.argsort(-np.asarray(logits0), axis=-1)[:, :c]
    eos = int(top0[0, 1])  # the runner-up of prompt 0's first step: a draft finishes
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, cfg.vocab_size, 3000) for _ in range(8)]
    docs += [p + [int(t)] for p, row in zip(prompts, top0) for t in row]
    ngram_table.build_ngram_table(docs, tmp_path, vocab_size=cfg.vocab_size, max_order=6)
    table = ngram_table.load_ngram_table(tmp_path).to_device()
    counts = brute_counts(docs, 6)

    @jax.jit
    def forward(params, last, w, cache):
        rows = model.apply({"params": params}, last, method=Transformer.embed_tokens)
        logits, _, cache = model.apply({"params": params}, cache=cache,
                                       embeddings=sp.superpose_embeddings(rows, w)[:, None])
        return logits[:, 0], cache.advance(1)

    state = sp.init_state(toks, lens, config, n)
    logits, recorded = logits0, []
    for t in range(n):
        recorded.append(np.asarray(logits))
        state, last, w = step_fn(state, logits, table, config, eos)
        if t < n - 1:
            logits, cache = forward(params, last, w, cache)

    tok = _Tok()
    tok.eos_id = eos
    res = generate(model, params, prompts, DecodeConfig(method="superposed", max_new_tokens=n,
                                                        superposed=config),
                   tokenizer=tok, table=table)
    tokens, lengths, scores, ppl, finished = (res.extras[name] for name in (
        "tokens", "lengths", "scores", "perplexities", "finished"))
    stepped = sp.rank_drafts(state, k)
    np.testing.assert_array_equal(tokens, np.asarray(stepped[0]))
    np.testing.assert_allclose(scores, np.asarray(stepped[2]), rtol=1e-5)
    assert np.asarray(finished).any() and np.isfinite(np.asarray(scores)).all()
    tokens, lengths, scores, ppl = map(np.asarray, (tokens, lengths, scores, ppl))
    np.testing.assert_allclose(ppl, np.exp(-scores / lengths), rtol=1e-5)
    for b, prompt in enumerate(prompts):
        assert np.all(np.diff(scores[b] / lengths[b]) <= 0)  # ranked by perplexity
        drafts = [tuple(tokens[b, d, :lengths[b, d]].tolist()) for d in range(k)]
        assert len(set(drafts)) == k
        for d, draft in enumerate(drafts):
            total = 0.0
            for t, tok in enumerate(draft):
                prefix = np.asarray([prompt + list(draft[:t])])
                lp = ref_log_probs(recorded[t][b], prefix, len(prompt) + t, counts, config)[0]
                assert np.isfinite(lp[tok]), "each token is a scored top-C candidate"
                total += lp[tok] - (NEG if tok == eos and not finished[b, d] else 0)
            if finished[b, d]:
                assert draft[-1] == eos and eos not in draft[:-1]
            np.testing.assert_allclose(scores[b, d], total, rtol=1e-5)
