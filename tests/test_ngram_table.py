"""N-gram tables: counts against a brute-force count, mmap round trip, on-device probes."""

import json
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.decode import ngram_table
from cadenza.errors import CadenzaError


def brute_counts(docs, max_order):
    """(context -> count, (context, next) -> count) by plain Python loops."""
    ctx, pair = Counter(), Counter()
    for doc in docs:
        doc = [int(t) for t in doc]
        for n in range(2, max_order + 1):
            for i in range(len(doc) - n + 1):
                c = tuple(doc[i:i + n - 1])
                ctx[c] += 1
                pair[(c, doc[i + n - 1])] += 1
    return ctx, pair


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    # Few symbols and short documents: many repeated n-grams, some length-0/1 documents.
    return [rng.integers(0, 6, size=rng.integers(0, 40)) for _ in range(40)]


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("ngram")
    ngram_table.build_ngram_table(corpus, out, vocab_size=6, max_order=5,
                            tokenizer={"kind": "test"}, sources=["synthetic"])
    return out


def test_counts_match_brute_force(table_dir, corpus):
    table = ngram_table.load_ngram_table(table_dir)
    ctx, pair = brute_counts(corpus, 5)
    stored_ctx = dict(zip(table.context_keys.tolist(), table.context_counts.tolist()))
    stored_pair = dict(zip(table.pair_keys.tolist(), table.pair_counts.tolist()))
    assert stored_ctx == {ngram_table.context_key(c): n for c, n in ctx.items()}
    assert stored_pair == {ngram_table.pair_key(c, t): n for (c, t), n in pair.items()}
    assert np.all(np.diff(table.context_keys.astype(np.uint64)) > 0)
    assert np.all(np.diff(table.pair_keys.astype(np.uint64)) > 0)


def test_mmap_round_trip_and_manifest(table_dir, corpus):
    table = ngram_table.load_ngram_table(table_dir)
    for arr in (table.context_keys, table.context_counts, table.pair_keys, table.pair_counts):
        assert isinstance(arr, np.memmap)
    assert table.context_keys.dtype == np.uint64 and table.pair_counts.dtype == np.uint32
    manifest = json.loads((table_dir / "manifest.json").read_text())
    assert manifest == table.manifest
    assert manifest["orders"] == [2, 3, 4, 5] and manifest["vocab_size"] == 6
    assert manifest["tokenizer"] == {"kind": "test"}
    assert manifest["corpus"]["documents"] == len(corpus)
    assert manifest["corpus"]["tokens"] == sum(len(d) for d in corpus)
    assert manifest["corpus"]["ngrams_per_order"]["2"] == sum(max(len(d) - 1, 0) for d in corpus)
    assert manifest["entries"]["pairs"] == table.pair_keys.shape[0]
    assert not list(table_dir.glob("*.pkl"))


def test_device_probe_matches_brute_force_probabilities(table_dir, corpus):
    ctx, pair = brute_counts(corpus, 5)
    device = ngram_table.load_ngram_table(table_dir).to_device()
    rng = np.random.default_rng(1)
    history = rng.integers(0, 6, size=(3, 5, 4)).astype(np.int32)
    history[0, 0] = corpus[1][-4:] if len(corpus[1]) >= 4 else history[0, 0]
    history_len = rng.integers(0, 7, size=(3, 5)).astype(np.int32)
    candidates = rng.integers(0, 7, size=(3, 5, 4)).astype(np.int32)  # 6 = never seen
    weights = (0.1, 0.2, 0.3, 0.4)
    got = jax.jit(lambda h, n, c: ngram_table.ngram_probs(device, h, n, c, weights))(
        history, history_len, candidates)
    want = np.zeros(candidates.shape, np.float64)
    for idx in np.ndindex(history_len.shape):
        for j in range(1, 5):
            c = tuple(int(t) for t in history[idx][4 - j:])
            if j <= history_len[idx] and ctx[c]:
                for i, cand in enumerate(candidates[idx]):
                    want[idx + (i,)] += weights[j - 1] * pair[(c, int(cand))] / ctx[c]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
    assert np.count_nonzero(want) > 10  # the probes hit real entries


def test_empty_table_reads_zero(tmp_path):
    ngram_table.build_ngram_table([[1], []], tmp_path, vocab_size=4, max_order=3)
    table = ngram_table.load_ngram_table(tmp_path)
    assert table.pair_keys.shape == (0,) and table.manifest["entries"]["contexts"] == 0
    g = ngram_table.ngram_probs(table.to_device(), jnp.ones((2, 2), jnp.int32),
                          jnp.full((2,), 5), jnp.ones((2, 3), jnp.int32), (1.0, 1.0))
    assert np.all(np.asarray(g) == 0)


def test_build_and_load_errors(tmp_path):
    with pytest.raises(CadenzaError, match="outside"):
        ngram_table.build_ngram_table([[0, 9]], tmp_path / "a", vocab_size=4)
    with pytest.raises(CadenzaError, match="max_order"):
        ngram_table.build_ngram_table([[0, 1]], tmp_path / "b", vocab_size=4, max_order=1)
    with pytest.raises(CadenzaError, match="manifest"):
        ngram_table.load_ngram_table(tmp_path)
    ngram_table.build_ngram_table([[0, 1, 2]], tmp_path / "c", vocab_size=4, max_order=3)
    table = ngram_table.load_ngram_table(tmp_path / "c").to_device()
    with pytest.raises(CadenzaError, match="order 3"):
        ngram_table.ngram_probs(table, jnp.ones((1, 3), jnp.int32), jnp.ones((1,), jnp.int32),
                          jnp.ones((1, 2), jnp.int32), (1.0, 1.0, 1.0))
