"""The shared verification primitive: chain/tree verify, rollback, compaction, acceptance rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cadenza.decode.verify import compact, exact_accept, greedy_accept, tree_mask, verify
from cadenza.models import KVCache, Transformer, init_params

PROMPT = [1, 17, 42, 99, 5, 8]
MAX_LEN = 32


_MODEL = []


@pytest.fixture
def model_params(tiny_config):
    if not _MODEL:
        cfg = tiny_config("llama")
        _MODEL.append((Transformer(cfg), init_params(cfg, jax.random.key(0))))
    return _MODEL[0]


_verify = jax.jit(verify, static_argnums=0)     # one compile per shape of the new tokens


def prefill(model, params, tokens):
    """Logits [len, V] of a fresh forward of ``tokens`` and its cache (right-padded to 16)."""
    padded = np.zeros((1, 16), np.int32)
    padded[0, :len(tokens)] = tokens
    cache = KVCache.create(model.config, 1, MAX_LEN)
    logits, _, cache = _verify(model, params, cache, jnp.asarray(padded))
    return logits[0, :len(tokens)], cache.with_lengths(len(tokens))


def test_chain_verify_equals_one_token_steps(model_params):
    model, params = model_params
    _, cache = prefill(model, params, PROMPT)
    new = [7, 300, 12, 5]
    chain, _, _ = _verify(model, params, cache, jnp.asarray([new]))
    c = cache
    for i, t in enumerate(new):
        step, _, c = _verify(model, params, c, jnp.asarray([[t]]))
        c = c.advance(1)
        np.testing.assert_allclose(chain[0, i], step[0, 0], atol=1e-5, rtol=1e-5)


def test_rollback_equals_fresh_prefill_of_accepted(model_params):
    model, params = model_params
    _, cache = prefill(model, params, PROMPT)
    _, _, cache = _verify(model, params, cache, jnp.asarray([[7, 300, 12, 5]]))
    cache = cache.advance(2)                        # keep 7, 300; 12, 5 rejected
    nxt, _, _ = _verify(model, params, cache, jnp.asarray([[44]]))
    fresh, _ = prefill(model, params, PROMPT + [7, 300, 44])
    np.testing.assert_allclose(nxt[0, 0], fresh[-1], atol=1e-5, rtol=1e-5)


PARENTS = [-1, 0, 0, 1, 1, 2, 3]
TREE = [7, 300, 12, 5, 9, 31, 64]


def tree_positions(length):
    depth = [0] * len(PARENTS)
    for i, par in enumerate(PARENTS):
        depth[i] = 0 if par < 0 else depth[par] + 1
    return jnp.asarray([[length + d for d in depth]])


def root_path(node):
    path = []
    while node >= 0:
        path.append(node)
        node = PARENTS[node]
    return path[::-1]


def test_tree_mask_is_ancestor_or_self():
    m = tree_mask(PARENTS)
    assert m[6].tolist() == [True, True, False, True, False, False, True]
    assert m.sum() == sum(len(root_path(i)) for i in range(len(PARENTS)))
    with pytest.raises(ValueError):
        tree_mask([-1, 2, 0])


def test_tree_node_logits_equal_causal_forward_of_root_path(model_params):
    model, params = model_params
    _, cache = prefill(model, params, PROMPT)
    logits, _, _ = _verify(model, params, cache, jnp.asarray([TREE]), tree_positions(len(PROMPT)),
                          jnp.asarray(tree_mask(PARENTS)))
    for node in range(len(TREE)):
        fresh, _ = prefill(model, params, PROMPT + [TREE[i] for i in root_path(node)])
        np.testing.assert_allclose(logits[0, node], fresh[-1], atol=1e-5, rtol=1e-5)


def test_compacted_kv_equals_kv_of_fed_path(model_params):
    model, params = model_params
    _, cache = prefill(model, params, PROMPT)
    _, _, cache = _verify(model, params, cache, jnp.asarray([TREE]), tree_positions(len(PROMPT)),
                         jnp.asarray(tree_mask(PARENTS)))
    path = root_path(6)                                         # 0 -> 1 -> 3 -> 6
    cache = compact(cache, jnp.asarray([path])).advance(len(path))
    _, fresh = prefill(model, params, PROMPT + [TREE[i] for i in path])
    n = len(PROMPT) + len(path)
    np.testing.assert_allclose(cache.k[:, :, :n], fresh.k[:, :, :n], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(cache.v[:, :, :n], fresh.v[:, :, :n], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache.positions[:, :n], fresh.positions[:, :n])
    nxt, _, _ = _verify(model, params, cache, jnp.asarray([[44]]))
    ref, _ = prefill(model, params, PROMPT + [TREE[i] for i in path] + [44])
    np.testing.assert_allclose(nxt[0, 0], ref[-1], atol=1e-5, rtol=1e-5)


def test_greedy_accept_prefix_and_next_token():
    logp = jnp.log(jax.nn.one_hot(jnp.asarray([[3, 1, 2, 0], [3, 1, 2, 0]]), 4) * 0.9 + 0.025)
    drafts = jnp.asarray([[3, 1, 0], [3, 1, 2]])
    n, y = greedy_accept(drafts, logp, jnp.asarray([3, 1]))
    assert n.tolist() == [2, 1] and y.tolist() == [2, 1]


@pytest.mark.parametrize("point_mass", [False, True])
def test_exact_rule_outputs_follow_target(point_mass):
    """One draft position: P(first output = x) must be p(x) whatever q is (chi-square)."""
    n_samples, v = 200_000, 6
    p64 = np.asarray([0.30, 0.25, 0.20, 0.15, 0.10, 0.0])
    p = jnp.asarray(p64, jnp.float32)
    q = jnp.asarray([0.05, 0.10, 0.15, 0.20, 0.25, 0.25])
    keys = jax.random.split(jax.random.key(0), n_samples)
    d = jax.vmap(lambda k: jax.random.categorical(jax.random.fold_in(k, 7), jnp.log(q)))(keys)
    qd = jax.nn.one_hot(d, v) if point_mass else jnp.broadcast_to(q, (n_samples, v))
    logp = jnp.log(jnp.broadcast_to(p, (n_samples, 2, v)))
    n, y = jax.jit(exact_accept)(d[:, None].astype(jnp.int32), logp, qd[:, None],
                                 jnp.ones((n_samples,), jnp.int32), keys)
    first = np.where(np.asarray(n) == 1, np.asarray(d), np.asarray(y))
    counts = np.bincount(first, minlength=v)
    assert counts[-1] == 0
    expected = p64[:-1] * n_samples
    assert stats.chisquare(counts[:-1], expected).pvalue > 1e-3
    # acceptance rate = sum_x q(x) min(1, p(x)/q(x)): sum min(p, q), or E_q[p(d)] for point masses
    alpha = float((q * p).sum() if point_mass else jnp.minimum(p, q).sum())
    assert abs(float(np.mean(np.asarray(n))) - alpha) < 0.005


def test_verify_longest_scores_only_as_far_as_the_longest_draft(model_params):
    from cadenza.decode.speculative import verify_longest, verify_widths

    model, params = model_params
    _, cache = prefill(model, params, PROMPT)
    nodes = jnp.asarray([[7, 300, 12, 5, 9, 4, 2]])
    positions = cache.lengths[:, None] + jnp.arange(7)[None, :]
    full, _, full_cache = _verify(model, params, cache, nodes)
    run = jax.jit(lambda c, n: verify_longest(model, params, c, nodes, positions,
                                              jnp.arange(7)[None, :] < n))
    assert verify_widths(7) == (2, 4, 7) and verify_widths(7, empty=True) == (1, 2, 4, 7)
    logits, hidden, short_cache, width = run(cache, 3)        # 3 valid tokens: width 4
    assert int(width) == 4 and logits.shape == full.shape and hidden.shape[:2] == (1, 7)
    np.testing.assert_allclose(logits[:, :4], full[:, :4], atol=1e-5, rtol=1e-5)
    assert not np.any(np.asarray(logits[:, 4:]))
    end = len(PROMPT) + 4
    np.testing.assert_allclose(short_cache.k[:, :, :end], full_cache.k[:, :, :end], atol=1e-5)
    assert int(run(cache, 5)[3]) == 7 and int(run(cache, 0)[3]) == 2   # none valid: narrowest
