"""Medusa heads and tree verification (greedy and exact sampling), on the speculative loop.

Heads (:class:`MedusaHeads`): K heads on the target's final hidden state h
at the position that produced the pending token y; head k guesses the token
k + 1 places after y: ``h + SiLU(W h + b)`` (W, b zero-initialised) per
block, then a vocabulary projection (initialised as a copy of the LM head,
so a fresh head k reproduces the base logits). Train them with ``cadenza
train`` and ``train.task: medusa`` (:mod:`cadenza.train.medusa_task`, base
frozen); they are saved as a head directory (:func:`save_medusa_heads`,
:func:`load_medusa_heads`) that also records the tree.

Tree (static, :class:`Medusa` ``paths``): each path ``(i_1, .., i_d)`` is a
node at depth d holding the ``i_d``-th best token of head d - 1 whose parent
is ``(i_1, .., i_{d-1})``; the root is y. One round verifies the root and
every node in one :func:`~cadenza.decode.verify.verify` call (positions
``L + depth``, ancestor-or-self mask, causal over the cached prefix; with a
repetition penalty each node counts the tokens on its root path as seen).
Acceptance (:func:`tree_greedy_accept`, :func:`tree_sample_accept`) picks
the deepest accepted node and the token y' after it; the node's root path's
keys/values are compacted into ``[L, L + depth + 1)``, y' becomes the new
pending token and the node's hidden state feeds the heads next round.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cadenza.decode import sampling
from cadenza.decode.speculative import SpecState, _Program, round_keys
from cadenza.decode.verify import compact, tree_mask, verify
from cadenza.errors import CadenzaError
from cadenza.models.transformer import Transformer

DEFAULT_PATHS = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0), (0, 0, 0, 0))


class MedusaHeads(nn.Module):
    """``num_heads`` heads: hidden [..., D] -> logits float32 [..., num_heads, vocab]."""

    num_heads: int
    vocab_size: int
    blocks: int = 1

    @nn.compact
    def __call__(self, h):
        h = h.astype(jnp.float32)
        outs = []
        for k in range(self.num_heads):
            x = h
            for i in range(self.blocks):
                x = x + nn.silu(nn.Dense(h.shape[-1], kernel_init=nn.initializers.zeros,
                                         name=f"head_{k}_block_{i}")(x))
            outs.append(nn.Dense(self.vocab_size, use_bias=False, name=f"head_{k}_out")(x))
        return jnp.stack(outs, axis=-2)


def init_medusa_heads(model_config, base_params, num_heads: int, blocks: int = 1, seed: int = 0):
    """Fresh heads: zero residual blocks, vocabulary projections copied from the LM head."""
    heads = MedusaHeads(num_heads, model_config.vocab_size, blocks)
    params = heads.init(jax.random.key(seed), jnp.zeros((1, model_config.hidden_size)))["params"]
    lm = (base_params["lm_head"]["kernel"] if "lm_head" in base_params
          else base_params["embed"]["embedding"].T)
    return {**params, **{f"head_{k}_out": {"kernel": jnp.asarray(lm, jnp.float32)}
                         for k in range(num_heads)}}


def tree_greedy_accept(nodes, logp, parents, depth):
    """Greedy tree rule: a node is good iff its token is the target's argmax at its parent.

    Args:
      nodes: int32 [B, N] node tokens (node 0 = root); logp: float32 [B, N, V] the
        target's next-token log-probs at each node; parents, depth: numpy int32 [N]
      (the root's parent is -1, its depth 0).
    Returns ``(win int32 [B], y int32 [B])``: the deepest node whose whole root path is
    good (the first such in node order) and the argmax after it.
    """
    best = jnp.argmax(logp, axis=-1).astype(jnp.int32)                 # [B, N]
    good = (nodes == best[:, np.maximum(parents, 0)]).at[:, 0].set(True)
    anc = jnp.asarray(tree_mask(parents))
    path_ok = jnp.all(good[:, None, :] | ~anc[None], axis=-1)          # [B, N]
    win = jnp.argmax(jnp.where(path_ok, jnp.asarray(depth)[None], -1), axis=1).astype(jnp.int32)
    return win, jnp.take_along_axis(best, win[:, None], axis=1)[:, 0]


def tree_sample_accept(nodes, logp, children, depth, keys):
    """Exact sampling on a token tree with point-mass drafts (sequential elimination).

    From the root: r = p at the current node; its children c_1, c_2, .. (rank order)
    are tried in turn, c_j accepted with probability ``r(c_j) / sum(r)``, else
    ``r(c_j) = 0``; an accepted child becomes the current node (r = its p), and
    when all are rejected (or there are none) y ~ r and the walk stops. The
    emitted path plus y is then distributed exactly as the target's own samples.

    Args:
      nodes: int32 [B, N]; logp: float32 [B, N, V] (warped, as the plain sampler's);
      children: numpy int32 [N, C], each node's children in trial order, -1 padded;
      depth: numpy int32 [N];
      keys: per-row PRNG keys [B] of this round.
    Returns ``(win int32 [B] the last accepted node, y int32 [B])``.
    """
    b, _, v = logp.shape
    levels, width = int(depth.max()) + 1, children.shape[1]
    ch = jnp.asarray(children)
    p = jnp.exp(logp)
    rows = jnp.arange(b)
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), (levels, width)))(keys)
    vocab = jnp.arange(v)[None, :]

    def try_child(d, j, carry):
        cur, alive, r, nxt, took = carry
        c = ch[cur, j]
        valid = alive & ~took & (c >= 0)
        tok = nodes[rows, jnp.maximum(c, 0)]
        r_tok = jnp.take_along_axis(r, tok[:, None], axis=1)[:, 0]
        acc = valid & (u[:, d, j] * jnp.sum(r, axis=-1) < r_tok)
        r = jnp.where((valid & ~acc)[:, None] & (vocab == tok[:, None]), 0.0, r)
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


@dataclasses.dataclass(frozen=True)
class Medusa:
    """Medusa drafter: ``paths`` is the static tree, ``blocks`` per head, ``heads`` the
    number of trained heads (0 = the tree's depth; at least the depth)."""

    paths: tuple = DEFAULT_PATHS
    blocks: int = 1
    heads: int = 0
    name: str = "medusa"

    def __post_init__(self):
        paths = [tuple(int(i) for i in p) for p in self.paths]
        if not paths or any(not p for p in paths) or any(min(p) < 0 for p in paths):
            raise ValueError("Medusa paths must be non-empty tuples of indices >= 0")
        for p in paths:
            if len(p) > 1 and p[:-1] not in paths:
                raise ValueError(f"Medusa path {p} has no parent {p[:-1]} in the tree")
        object.__setattr__(self, "paths", tuple(sorted(set(paths), key=lambda p: (len(p), p))))
        if self.heads and self.heads < self.gamma:
            raise ValueError(f"the Medusa tree is {self.gamma} deep but there are only "
                             f"{self.heads} heads")

    @property
    def gamma(self) -> int:             # deepest node: tokens per round beyond the root
        return max(len(p) for p in self.paths)

    @property
    def slots(self) -> int:             # cache slots a round writes beyond L
        return len(self.paths) + 1

    @property
    def num_heads(self) -> int:
        return self.heads or self.gamma

    program = property(lambda self: TreeProgram)

    def models(self):
        return []

    def init(self, program, draft_params, tokens, lengths, first):
        return None          # TreeProgram.prefill sets the hidden state the heads read

    def cost_ratio(self, params, draft_params) -> float:
        return 0.0

    def tree(self):
        """numpy buffers: parents [N], depth [N], head [N], rank [N], root paths [N, D + 1]
        and children [N, C] (each node's, in rank order, -1 padded)."""
        nodes = [()] + list(self.paths)
        index = {p: i for i, p in enumerate(nodes)}
        parents = np.asarray([-1] + [index[p[:-1]] for p in self.paths], np.int32)
        depth = np.asarray([len(p) for p in nodes], np.int32)
        head = np.maximum(depth - 1, 0)
        rank = np.asarray([0] + [p[-1] for p in self.paths], np.int32)
        retrieve = np.zeros((len(nodes), self.gamma + 1), np.int32)
        for i, p in enumerate(nodes):
            retrieve[i, :len(p) + 1] = [index[p[:j]] for j in range(len(p) + 1)]
        kids = [[i for i in range(1, len(nodes)) if parents[i] == a] for a in range(len(nodes))]
        children = np.full((len(nodes), max(len(k) for k in kids)), -1, np.int32)
        for a, k in enumerate(kids):
            children[a, :len(k)] = k
        return parents, depth, head, rank, retrieve, children


def save_medusa_heads(directory, drafter: Medusa, model_config, params):
    """Write trained heads and their tree to a new head directory
    (:mod:`cadenza.decode.head_dir`, kind ``medusa``), recording the base model's
    vocabulary and hidden sizes. Returns the directory's path."""
    from cadenza.decode.head_dir import save_head_dir

    meta = {"num_heads": drafter.num_heads, "blocks": drafter.blocks,
            "paths": [list(p) for p in drafter.paths],
            "vocab_size": model_config.vocab_size, "hidden_size": model_config.hidden_size}
    return save_head_dir(directory, "medusa", meta, params)


def load_medusa_heads(directory, model_config):
    """Read a Medusa head directory for the target ``model_config``: returns
    ``(Medusa drafter, head params)``. Raises CadenzaError before compiling when the
    heads were trained on a model with another vocabulary or hidden size (both named)."""
    from cadenza.decode.head_dir import check_meta, load_head_dir, read_meta

    meta = read_meta(directory, "medusa")
    check_meta(meta, {"vocab_size": model_config.vocab_size,
                      "hidden_size": model_config.hidden_size}, directory, "the target model")
    try:
        drafter = Medusa(paths=tuple(tuple(p) for p in meta["paths"]), blocks=int(meta["blocks"]),
                         heads=int(meta["num_heads"]))
    except ValueError as e:
        raise CadenzaError(f"invalid Medusa tree: {e}", where=str(directory),
                           fix="write the directory with save_medusa_heads") from None
    heads = MedusaHeads(drafter.num_heads, model_config.vocab_size, drafter.blocks)
    abstract = jax.eval_shape(lambda: heads.init(
        jax.random.key(0), jnp.zeros((1, model_config.hidden_size)))["params"])
    return drafter, load_head_dir(directory, "medusa", abstract)[1]


@dataclasses.dataclass(frozen=True)
class TreeProgram(_Program):
    """The speculative loop with a Medusa tree round (see module docstring)."""

    def prefill(self, params, tokens, lengths, seeds, stop_ids) -> SpecState:
        state = super().prefill(params, tokens, lengths, seeds, stop_ids)
        _, hidden, _ = verify(Transformer(self.target), params[0], None, tokens, rules=self.rules)
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return state.replace(drafter=last)

    def _round(self, params, s: SpecState) -> SpecState:
        tparams, heads = params
        m: Medusa = self.drafter
        parents, depth, head, rank, retrieve, children = m.tree()
        c = s.core
        b, g = c.tokens.shape[0], m.gamma
        rows = jnp.arange(b)
        pending = c.tokens[rows, c.num_generated - 1]
        cache = c.caches[0]
        guesses = MedusaHeads(m.num_heads, self.target.vocab_size, m.blocks).apply(
            {"params": heads}, s.drafter)                                   # [B, K, V]
        top = jax.lax.top_k(guesses, int(rank.max()) + 1)[1].astype(jnp.int32)
        nodes = top[:, head, rank].at[:, 0].set(pending)                   # [B, N]
        anc = tree_mask(parents)
        logits, hidden, cache = verify(
            Transformer(self.target), tparams, cache, nodes,
            positions=cache.lengths[:, None] + jnp.asarray(depth)[None, :],
            tail_mask=jnp.asarray(anc), rules=self.rules)
        n_nodes, v = nodes.shape[1], logits.shape[-1]
        seen = None
        if c.seen is not None:            # a node has seen the tokens on its root path
            hot = jax.nn.one_hot(nodes, v, dtype=jnp.float32)
            on_path = jnp.einsum("ik,bkv->biv", jnp.asarray(anc, jnp.float32), hot) > 0
            seen = (c.seen[:, None] | on_path).reshape(b * n_nodes, v)
        logp = sampling.log_probs(logits.reshape(b * n_nodes, v), self.spec, seen
                                  ).reshape(b, n_nodes, v)
        if self.spec.method == "greedy":
            win, y = tree_greedy_accept(nodes, logp, parents, depth)
        else:
            win, y = tree_sample_accept(nodes, logp, children, depth,
                                        round_keys(c.keys, c.step))
        n = jnp.asarray(depth)[win]
        path = jnp.asarray(retrieve)[win]                                  # [B, D + 1]
        j = jnp.arange(g + 1)[None, :]
        nxt = jnp.take_along_axis(nodes, jnp.minimum(path[:, 1:], n_nodes - 1), axis=1)
        emitted = jnp.where(j < n[:, None], jnp.concatenate([nxt, nxt[:, :1]], axis=1),
                            jnp.where(j == n[:, None], y[:, None], 0))
        lp = jnp.take_along_axis(jnp.take_along_axis(logp, path[..., None], axis=1),
                                 emitted[..., None], axis=-1)[..., 0]
        active = ~c.done
        core = self.advance(c, compact(cache, path), emitted, lp, n)
        act = active[:, None]
        pos = jnp.arange(g)[None, :]
        return SpecState(
            core=core, prev=s.prev,
            drafter=jnp.where(act, hidden[rows, win], s.drafter),
            forwards=s.forwards + active.astype(jnp.int32),
            proposed=s.proposed + jnp.sum(act & (pos >= 0), axis=0, dtype=jnp.int32),
            accepted=s.accepted + jnp.sum(act & (pos < n[:, None]), axis=0, dtype=jnp.int32))
