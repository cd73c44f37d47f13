"""The one verification primitive of the speculative family, its acceptance rules and rollback.

Every speculative round (:mod:`cadenza.decode.speculative`, whatever the
drafter) calls :func:`verify` once to score the proposed tokens against the
target's KV cache, then keeps a per-row path of them:

- :func:`verify`: ``T`` new tokens per row at ``[L_b, L_b + T)``; query ``i``
  sees cache slots ``< L_b`` and new token ``k`` iff ``tail_mask[i, k]``
  (chain = lower-triangular, tree = ancestor-or-self). The keys/values are
  written but ``lengths`` is not advanced: the caller accepts ``n_b`` and
  advances (rollback = a lower ``lengths``; nothing is erased).
- :func:`greedy_accept` / :func:`exact_accept`: how many of ``g_b`` chained
  drafts a row keeps, and the token that follows them (the target's argmax,
  the residual sample or the bonus token); :func:`tree_greedy_accept` /
  :func:`tree_sample_accept`: the same on a token tree (point-mass drafts).
- :func:`tree_mask`, :func:`compact`: token trees (ancestor mask; gather the
  accepted path's keys/values into consecutive slots).
"""

import jax
import jax.numpy as jnp
import numpy as np

from cadenza.decode.forward import as_forward
from cadenza.models.cache import KVCache


def verify(forward, params, cache: KVCache, tokens, positions=None, tail_mask=None):
    """Score ``tokens`` int32 [B, T] against ``cache`` in one forward.

    Args:
      forward: a forward (:mod:`cadenza.decode.forward`) or a Transformer; params: its params.
      positions: int32 [B, T]; default ``cache.lengths[:, None] + arange(T)`` (a chain).
      tail_mask: bool [T, T] or [B, T, T] visibility among the new tokens; default causal.

    Returns ``(logits float32 [B, T, V], hidden [B, T, D], cache)`` with the new
    keys/values written at ``[lengths, lengths + T)`` and ``lengths`` unchanged.
    The caller must ensure ``lengths + T <= cache.max_len``.
    """
    return as_forward(forward)(params, tokens, positions=positions, attention_mask=tail_mask,
                               cache=cache)


def greedy_accept(drafts, target_logp, draft_len):
    """Greedy rule: keep drafts while each equals the target's argmax.

    Args:
      drafts: int32 [B, G] proposed tokens d_1..d_G.
      target_logp: float32 [B, G + 1, V]; row i scores d_{i+1}, row G is the bonus.
      draft_len: int32 [B] number of real drafts per row (g_b <= G); later ones are ignored.

    Returns ``(n int32 [B] accepted drafts, y int32 [B] = argmax of target_logp[:, n])``.
    """
    best = jnp.argmax(target_logp, axis=-1).astype(jnp.int32)            # [B, G+1]
    g = drafts.shape[1]
    good = (drafts == best[:, :g]) & (jnp.arange(g)[None, :] < draft_len[:, None])
    n = jnp.sum(jnp.cumprod(good.astype(jnp.int32), axis=1), axis=1)
    return n, jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]


def exact_accept(drafts, target_logp, draft_probs, draft_len, keys):
    """The exact speculative-sampling rule (Leviathan et al. / Chen et al.).

    d_i was drawn from ``draft_probs[:, i-1]`` = q_i (a point mass for n-gram
    drafts). Accept d_i iff ``u_i * q_i(d_i) < p_i(d_i)`` (u_i ~ U(0,1)); n =
    length of the accepted prefix (at most ``draft_len``). If n < g_b the next
    token is drawn from ``norm(max(0, p_{n+1} - q_{n+1}))`` (p_{n+1} itself if
    that is all zero), else from p_{n+1} (the bonus token). The output
    tokens are then distributed exactly as the target's p.

    Args:
      drafts: int32 [B, G]; target_logp: float32 [B, G + 1, V] (after the same
        warpers as the draft); draft_probs: float32 [B, G, V]; draft_len: int32 [B];
      keys: PRNG keys [B] for this round (one per row).

    Returns ``(n int32 [B], y int32 [B])``.
    """
    b, g = drafts.shape
    p = jnp.exp(target_logp)
    p_d = jnp.take_along_axis(p[:, :g], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), (g,)))(keys)
    ok = (u * q_d < p_d) & (jnp.arange(g)[None, :] < draft_len[:, None])
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    p_next = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
    q_next = jnp.take_along_axis(draft_probs, jnp.minimum(n, g - 1)[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_next - q_next, 0.0)
    use_residual = (n < draft_len)[:, None] & (jnp.sum(residual, -1, keepdims=True) > 0)
    dist = jnp.where(use_residual, residual, p_next)
    y = jax.vmap(lambda k, d: jax.random.categorical(jax.random.fold_in(k, 1), jnp.log(d)))(
        keys, dist)
    return n, y.astype(jnp.int32)


def tree_mask(parents) -> np.ndarray:
    """Ancestor-or-self mask bool [N, N] of a tree given ``parents`` (node 0 = root, parent -1).

    Parents must precede their children (breadth-first order).
    """
    n = len(parents)
    mask = np.eye(n, dtype=bool)
    for i, par in enumerate(parents):
        if par >= 0:
            if par >= i:
                raise ValueError(f"node {i}'s parent {par} does not precede it")
            mask[i] |= mask[par]
    return mask


def compact(cache: KVCache, path) -> KVCache:
    """Move a tree's accepted path into consecutive slots (lengths unchanged).

    The tree was verified at slots ``[L_b, L_b + N)``; ``path`` int32 [B, P]
    holds node indices (root first; entries past the accepted length may be
    anything valid). Slots ``L_b + path[b, j]`` are copied to ``L_b + j``.
    """
    def move(a, start, idx):   # one row of a [layers, S, ...] array
        g = jnp.take(a, start + idx, axis=1)
        return jax.lax.dynamic_update_slice(a, g, (0, start) + (0,) * (a.ndim - 2))

    def move_positions(p, start, idx):   # one row [S]
        return jax.lax.dynamic_update_slice(p, jnp.take(p, start + idx), (start,))

    names = ("k", "v", "k_scale", "v_scale")   # an int8 cache moves its scales too
    moved = {n: jax.vmap(move, in_axes=(1, 0, 0), out_axes=1)(a, cache.lengths, path)
             for n, a in zip(names, cache.layers())}
    pos = jax.vmap(move_positions)(cache.positions, cache.lengths, path)
    return cache.replace(positions=pos, **moved)


def tree_greedy_accept(nodes, logp, parents, depth, valid=None):
    """Greedy tree rule: a node is good iff valid and its token is the target's argmax at
    its parent.

    Args:
      nodes: int32 [B, N] node tokens (node 0 = root); logp: float32 [B, N, V] the
        target's next-token log-probs at each node; parents, depth: numpy int32 [N]
        (the root's parent is -1, its depth 0); valid: bool [B, N] or None (all valid).
    Returns ``(win int32 [B], y int32 [B])``: the deepest node whose whole root path is
    good (the first such in node order) and the argmax after it.
    """
    best = jnp.argmax(logp, axis=-1).astype(jnp.int32)                 # [B, N]
    good = nodes == best[:, np.maximum(parents, 0)]
    if valid is not None:
        good = good & valid
    good = good.at[:, 0].set(True)
    anc = jnp.asarray(tree_mask(parents))
    path_ok = jnp.all(good[:, None, :] | ~anc[None], axis=-1)          # [B, N]
    win = jnp.argmax(jnp.where(path_ok, jnp.asarray(depth)[None], -1), axis=1).astype(jnp.int32)
    return win, jnp.take_along_axis(best, win[:, None], axis=1)[:, 0]


def tree_sample_accept(nodes, logp, children, depth, keys, valid=None):
    """Exact sampling on a token tree with point-mass drafts (sequential elimination).

    From the root: r = p at the current node; its valid children c_1, c_2, .. (in
    order) are tried in turn, c_j accepted with probability ``r(c_j) / sum(r)``,
    else ``r(c_j) = 0``; an accepted child becomes the current node (r = its p),
    and when all are rejected (or there are none) y ~ r and the walk stops. The
    emitted path plus y is then distributed exactly as the target's own samples.

    Args:
      nodes: int32 [B, N]; logp: float32 [B, N, V] (warped, as the plain sampler's);
      children: numpy int32 [N, C], each node's children in trial order, -1 padded;
      depth: numpy int32 [N]; keys: per-row PRNG keys [B] of this round;
      valid: bool [B, N] or None (all valid).
    Returns ``(win int32 [B] the last accepted node, y int32 [B])``.
    """
    b, _, v = logp.shape
    levels, width = int(depth.max()) + 1, children.shape[1]
    ch = jnp.asarray(children)
    p = jnp.exp(logp)
    rows = jnp.arange(b)
    ok = jnp.ones(nodes.shape, bool) if valid is None else valid
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), (levels, width)))(keys)
    vocab = jnp.arange(v)[None, :]

    def try_child(d, j, carry):
        cur, alive, r, nxt, took = carry
        c = ch[cur, j]
        cc = jnp.maximum(c, 0)
        good = alive & ~took & (c >= 0) & ok[rows, cc]
        tok = nodes[rows, cc]
        r_tok = jnp.take_along_axis(r, tok[:, None], axis=1)[:, 0]
        acc = good & (u[:, d, j] * jnp.sum(r, axis=-1) < r_tok)
        r = jnp.where((good & ~acc)[:, None] & (vocab == tok[:, None]), 0.0, r)
        return cur, alive, r, jnp.where(acc, c, nxt), took | acc

    def level(d, carry):                 # a walk visits at most one node per depth
        cur, alive, r = carry
        r = jnp.where(alive[:, None], p[rows, cur], r)
        cur, alive, r, nxt, took = jax.lax.fori_loop(
            0, width, lambda j, c: try_child(d, j, c),
            (cur, alive, r, cur, jnp.zeros((b,), bool)))
        return nxt, alive & took, r

    cur, _, r = jax.lax.fori_loop(0, levels, level, (jnp.zeros((b,), jnp.int32),
                                                      jnp.ones((b,), bool), p[:, 0]))
    r = jnp.where(jnp.sum(r, axis=-1, keepdims=True) > 0, r, p[rows, cur])
    y = jax.vmap(lambda k, d: jax.random.categorical(jax.random.fold_in(k, 1), jnp.log(d)))(
        keys, r)
    return cur, y.astype(jnp.int32)
