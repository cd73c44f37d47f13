"""Medusa heads and tree verification (greedy), on the speculative loop.

Heads (:class:`MedusaHeads`): K heads on the target's final hidden state h
at the position that produced the pending token y; head k guesses the token
k + 1 places after y: ``h + SiLU(W h + b)`` (W, b zero-initialised) per
block, then a vocabulary projection (initialised as a copy of the LM head,
so a fresh head k reproduces the base logits). Train them with
:func:`cadenza.train.medusa_task.train_medusa_heads` (base frozen).

Tree (static, :class:`Medusa` ``paths``): each path ``(i_1, .., i_d)`` is a
node at depth d holding the ``i_d``-th best token of head d - 1 whose parent
is ``(i_1, .., i_{d-1})``; the root is y. One round verifies the root and
every node in one :func:`~cadenza.decode.verify.verify` call (positions
``L + depth``, ancestor-or-self mask, causal over the cached prefix); a node
is good iff its token is the target's argmax at its parent; the deepest
node whose whole root path is good wins; its path's keys/values are
compacted into ``[L, L + depth + 1)`` and the argmax after it becomes the
new pending token, its hidden state feeds the heads next round.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cadenza.decode import sampling
from cadenza.decode.speculative import SpecState, _Program
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


@dataclasses.dataclass(frozen=True)
class Medusa:
    """Medusa drafter (greedy only): ``paths`` is the static tree, ``blocks`` per head."""

    paths: tuple = DEFAULT_PATHS
    blocks: int = 1
    name: str = "medusa"

    def __post_init__(self):
        paths = [tuple(p) for p in self.paths]
        if not paths or any(not p for p in paths):
            raise ValueError("Medusa paths must be non-empty index tuples")
        for p in paths:
            if len(p) > 1 and p[:-1] not in paths:
                raise ValueError(f"Medusa path {p} has no parent {p[:-1]} in the tree")
        object.__setattr__(self, "paths", tuple(sorted(set(paths), key=lambda p: (len(p), p))))

    @property
    def gamma(self) -> int:             # deepest node: tokens per round beyond the root
        return max(len(p) for p in self.paths)

    @property
    def slots(self) -> int:             # cache slots a round writes beyond L
        return len(self.paths) + 1

    @property
    def num_heads(self) -> int:
        return self.gamma

    program = property(lambda self: TreeProgram)

    def models(self):
        return []

    def check_spec(self, spec) -> None:
        """Medusa here is greedy tree verification without a repetition penalty."""
        if spec.method != "greedy" or spec.uses_history:
            raise CadenzaError("Medusa decoding supports greedy decoding without a repetition "
                               "penalty", where="decode.method",
                               fix="use method=greedy and repetition_penalty=1")

    def init(self, program, draft_params, tokens, lengths, first):
        return None          # TreeProgram.prefill sets the hidden state the heads read

    def cost_ratio(self, params, draft_params) -> float:
        return 0.0

    def tree(self):
        """numpy buffers: parents [N], depth [N], head [N], rank [N], root paths [N, D + 1]."""
        nodes = [()] + list(self.paths)
        index = {p: i for i, p in enumerate(nodes)}
        parents = np.asarray([-1] + [index[p[:-1]] for p in self.paths], np.int32)
        depth = np.asarray([len(p) for p in nodes], np.int32)
        head = np.maximum(depth - 1, 0)
        rank = np.asarray([0] + [p[-1] for p in self.paths], np.int32)
        retrieve = np.zeros((len(nodes), self.gamma + 1), np.int32)
        for i, p in enumerate(nodes):
            retrieve[i, :len(p) + 1] = [index[p[:j]] for j in range(len(p) + 1)]
        return parents, depth, head, rank, retrieve


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
        parents, depth, head, rank, retrieve = m.tree()
        c = s.core
        b, g = c.tokens.shape[0], m.gamma
        rows = jnp.arange(b)
        pending = c.tokens[rows, c.num_generated - 1]
        cache = c.caches[0]
        guesses = MedusaHeads(m.num_heads, self.target.vocab_size, m.blocks).apply(
            {"params": heads}, s.drafter)                                   # [B, K, V]
        top = jax.lax.top_k(guesses, int(rank.max()) + 1)[1].astype(jnp.int32)
        nodes = top[:, head, rank].at[:, 0].set(pending)                   # [B, N]
        logits, hidden, cache = verify(
            Transformer(self.target), tparams, cache, nodes,
            positions=cache.lengths[:, None] + jnp.asarray(depth)[None, :],
            tail_mask=jnp.asarray(tree_mask(parents)), rules=self.rules)
        n_nodes, v = nodes.shape[1], logits.shape[-1]
        logp = sampling.log_probs(logits.reshape(b * n_nodes, v), self.spec,
                                  None if c.seen is None else jnp.repeat(c.seen, n_nodes, 0)
                                  ).reshape(b, n_nodes, v)
        best = jnp.argmax(logp, axis=-1).astype(jnp.int32)                 # [B, N]
        good = (nodes == best[:, np.maximum(parents, 0)]).at[:, 0].set(True)
        anc = jnp.asarray(tree_mask(parents))
        path_ok = jnp.all(good[:, None, :] | ~anc[None], axis=-1)          # [B, N]
        win = jnp.argmax(jnp.where(path_ok, jnp.asarray(depth)[None], -1), axis=1)
        n = jnp.asarray(depth)[win]
        path = jnp.asarray(retrieve)[win]                                  # [B, D + 1]
        j = jnp.arange(g + 1)[None, :]
        y = best[rows, win]
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
