"""Token Recycling: drafts read from the target's own past top-k predictions (training-free).

Luo et al., "Turning Trash into Treasure: Accelerating Inference of Large Language
Models with Token Recycling" (2024). Every verification scores each node of the draft
tree and produces a full distribution there, most of which is thrown away. This drafter
keeps it: an adjacency matrix ``M`` int32 [V, k] per row, where ``M[v]`` holds the
target's ``k`` most likely next tokens the last time it scored a node holding ``v``.

Each round the drafter expands a static tree breadth-first from the pending token: the
child of rank ``r`` of a node holding ``v`` holds ``M[v, r]``. The round verifies the tree
in one forward (ancestor mask), accepts the deepest matching path (greedy) or samples
exactly (sequential elimination on point masses), and ``observe`` writes the top-k of the
target's logits at *every* node into ``M`` (where a token occurs at several nodes, the
accepted path wins, then the later node). ``M`` starts from the prompt's own bigrams, or
from a matrix passed as draft params (a warm start: successors known in advance).

The tree (:func:`recycling_tree`) holds the ``nodes`` index paths of highest prior
score ``prod 2^-(r_i + 1)`` at most ``depth`` deep (ties: deeper, then smaller ranks
first), so rank-0 chains are deepest. State per row: ``V * k * 4`` bytes (1 MiB at
V = 32k, k = 8) plus the last tree's tokens.
"""

import dataclasses
import heapq

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cadenza.decode.speculative import Proposal
from cadenza.errors import CadenzaError


def recycling_tree(nodes: int, depth: int, k: int) -> tuple:
    """The ``nodes`` index paths ``(r_1, .., r_d)`` (``r_i < k``, ``d <= depth``) of highest
    prior score ``prod 2^-(r_i + 1)`` (ties: the deeper path, then smaller ranks), sorted
    breadth-first (by length, then ranks); every path's parent is in the set."""
    if nodes < 1 or depth < 1 or k < 1:
        raise ValueError("a recycling tree needs nodes, depth and k >= 1")
    frontier = [(r + 1, -1, (r,)) for r in range(k)]
    heapq.heapify(frontier)
    chosen = []
    while frontier and len(chosen) < nodes:
        cost, neg_length, path = heapq.heappop(frontier)
        chosen.append(path)
        if -neg_length < depth:
            for r in range(k):
                heapq.heappush(frontier, (cost + r + 1, neg_length - 1, path + (r,)))
    return tuple(sorted(chosen, key=lambda p: (len(p), p)))


@flax.struct.dataclass
class RecyclingState:
    """``matrix`` int32 [B, V, k]: each row's successor table; ``nodes`` int32 [B, N + 1]:
    the last proposed tree (pending token first), read by ``observe``."""

    matrix: jax.Array
    nodes: jax.Array


@dataclasses.dataclass(frozen=True)
class TokenRecycling:
    """Token Recycling drafter: ``k`` successors per token, a static tree of ``nodes`` nodes
    at most ``depth`` deep. Draft params: None (start from the prompts' bigrams) or an
    int32 matrix [V, k] or [B, V, k] to start from."""

    k: int = 8
    nodes: int = 4
    depth: int = 3
    name: str = "recycling"
    depth_field = "decode.recycling.depth"      # named when the tree is too deep

    def __post_init__(self):
        for field in ("k", "nodes", "depth"):
            if getattr(self, field) < 1:
                raise ValueError(f"TokenRecycling.{field} must be >= 1")

    @property
    def paths(self) -> tuple:
        return recycling_tree(self.nodes, self.depth, self.k)

    @property
    def parents(self) -> tuple:
        """Each node's parent (-1 = the pending token), nodes in ``paths`` order."""
        paths = self.paths
        index = {p: i for i, p in enumerate(paths)}
        return tuple(index[p[:-1]] if len(p) > 1 else -1 for p in paths)

    def check(self, forward, draft_params) -> None:
        """Refuse (before compiling) ``k`` above the vocabulary or a warm-start matrix of
        the wrong shape, naming the field."""
        v = forward.config.vocab_size
        if self.k > v:
            raise CadenzaError(f"k = {self.k} successors per token exceeds the vocabulary "
                               f"({v} tokens)", where="decode.recycling.k",
                               fix=f"use k <= {v}")
        if draft_params is not None:
            shape = tuple(np.shape(draft_params))
            if shape[-2:] != (v, self.k) or len(shape) not in (2, 3):
                raise CadenzaError(f"the warm-start matrix has shape {shape}, expected "
                                   f"({v}, {self.k}) or (batch, {v}, {self.k})",
                                   where="draft_params", fix="pass a matrix from an earlier "
                                   "call with the same model and k, or None")

    def cost_ratio(self, params, draft_params) -> float:
        return 0.0

    def init(self, draft_params, pre) -> RecyclingState:
        """The warm-start matrix, else zeros with each prompt's bigrams in column 0
        (``M[t_i, 0] = t_{i+1}``, the prompt's last token followed by the first emitted)."""
        tokens, lengths = pre.batch.tokens, pre.batch.lengths
        b, t = tokens.shape
        v = pre.forward.config.vocab_size
        rows = jnp.arange(b)
        nodes = jnp.zeros((b, len(self.parents) + 1), jnp.int32)
        if draft_params is not None:
            m = jnp.asarray(draft_params, jnp.int32)
            return RecyclingState(matrix=jnp.broadcast_to(m, (b, v, self.k)), nodes=nodes)
        nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
        nxt = nxt.at[rows, lengths - 1].set(pre.first)
        pos = jnp.arange(t)[None, :]
        src = jnp.where(pos < lengths[:, None], tokens, v)                   # v: dropped
        last = jnp.full((b, v), -1, jnp.int32).at[rows[:, None], src].max(
            jnp.broadcast_to(pos, (b, t)), mode="drop")                    # later bigrams win
        col = jnp.where(last >= 0, jnp.take_along_axis(nxt, jnp.maximum(last, 0), axis=1), 0)
        m = jnp.zeros((b, v, self.k), jnp.int32).at[:, :, 0].set(col)
        return RecyclingState(matrix=m, nodes=nodes)

    def propose(self, draft_params, state: RecyclingState, ctx):
        """The tree expanded breadth-first from the pending token through ``M`` (point masses)."""
        paths, parents = self.paths, np.asarray(self.parents) + 1   # 0 = the pending token
        rank = np.asarray([p[-1] for p in paths], np.int32)
        depth = np.asarray([len(p) for p in paths])
        rows = jnp.arange(ctx.pending.shape[0])[:, None]
        toks = ctx.pending[:, None]
        for d in range(1, int(depth.max()) + 1):
            level = np.flatnonzero(depth == d)
            toks = jnp.concatenate(
                [toks, state.matrix[rows, toks[:, parents[level]], rank[level][None, :]]], axis=1)
        prop = Proposal(tokens=toks[:, 1:], valid=jnp.ones(toks[:, 1:].shape, bool), q=None,
                        parents=self.parents)
        return prop, state.replace(nodes=toks)

    def observe(self, draft_params, state: RecyclingState, obs) -> RecyclingState:
        """Write the target's top-k at every node of the verified tree into ``M`` (rows that
        were running; one write per distinct token: accepted path first, then later nodes)."""
        nodes = state.nodes
        b, n = nodes.shape
        v = state.matrix.shape[1]
        top = jax.lax.top_k(obs.logits, self.k)[1].astype(jnp.int32)            # [B, N+1, k]
        j = jnp.arange(obs.path.shape[1])[None, :]
        on_path = jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], obs.path].max(
            j <= obs.n[:, None])
        prio = on_path * n + jnp.arange(n)[None, :]
        same = nodes[:, :, None] == nodes[:, None, :]
        beaten = jnp.any(same & (prio[:, None, :] > prio[:, :, None]), axis=-1)
        write = ~beaten & obs.active[:, None]
        dst = jnp.where(write, nodes, v)
        m = state.matrix.at[jnp.arange(b)[:, None], dst].set(top, mode="drop")
        return state.replace(matrix=m)
