"""Medusa: trained heads proposing a static token tree, a drafter of the speculative round.

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
is ``(i_1, .., i_{d-1})``; the root is the pending token y. The heads read the
target's hidden state where it produced y, which the speculative round keeps
(from the prefill's last prompt position, then from the accepted node), so
the target runs once per prompt and once per round. Verification, acceptance
(greedy, or exact sampling with point masses) and compaction are the round's
(:mod:`cadenza.decode.speculative`).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cadenza.decode.speculative import Proposal
from cadenza.errors import CadenzaError

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


def lm_head_copies(base_params, num_heads: int) -> dict:
    """``{"head_k_out": {"kernel": the base LM head [D, V] float32}}`` for k < ``num_heads``:
    the vocabulary projections a fresh head starts from (tied embeddings: the embedding's
    transpose)."""
    lm = (base_params["lm_head"]["kernel"] if "lm_head" in base_params
          else base_params["embed"]["embedding"].T)
    return {f"head_{k}_out": {"kernel": jnp.asarray(lm, jnp.float32)} for k in range(num_heads)}


def init_medusa_heads(model_config, base_params, num_heads: int, blocks: int = 1, seed: int = 0):
    """Fresh heads: zero residual blocks, vocabulary projections copied from the LM head."""
    heads = MedusaHeads(num_heads, model_config.vocab_size, blocks)
    params = heads.init(jax.random.key(seed), jnp.zeros((1, model_config.hidden_size)))["params"]
    return {**params, **lm_head_copies(base_params, num_heads)}


@dataclasses.dataclass(frozen=True)
class Medusa:
    """Medusa drafter: ``paths`` is the static tree, ``blocks`` per head, ``heads`` the
    number of trained heads (0 = the tree's depth; at least the depth)."""

    paths: tuple = DEFAULT_PATHS
    blocks: int = 1
    heads: int = 0
    name: str = "medusa"
    kind = "medusa"          # the head directory's kind (not a field)

    def __post_init__(self):
        paths = [tuple(int(i) for i in p) for p in self.paths]
        if not paths or any(not p for p in paths) or any(min(p) < 0 for p in paths):
            raise ValueError(f"{self.kind} paths must be non-empty tuples of indices >= 0")
        for p in paths:
            if len(p) > 1 and p[:-1] not in paths:
                raise ValueError(f"{self.kind} path {p} has no parent {p[:-1]} in the tree")
        object.__setattr__(self, "paths", tuple(sorted(set(paths), key=lambda p: (len(p), p))))
        if self.heads and self.heads < self.gamma:
            raise ValueError(f"the {self.kind} tree is {self.gamma} deep but there are only "
                             f"{self.heads} heads")

    @property
    def gamma(self) -> int:             # deepest node: tokens per round beyond the root
        return max(len(p) for p in self.paths)

    @property
    def num_heads(self) -> int:
        return self.heads or self.gamma

    @property
    def parents(self) -> tuple:
        """Each node's parent (-1 = the pending token), nodes in ``paths`` order."""
        index = {p: i for i, p in enumerate(self.paths)}
        return tuple(index[p[:-1]] if len(p) > 1 else -1 for p in self.paths)

    def check(self, forward, draft_params) -> None:
        """Nothing to check before compiling (the head directory was checked on loading)."""

    def cost_ratio(self, params, draft_params) -> float:
        return 0.0

    def init(self, draft_params, pre):
        return None          # the heads read the round's target hidden state

    def propose(self, heads, state, ctx):
        """Node tokens: head ``depth - 1``'s ``rank``-th best guess (point masses)."""
        head, rank = self.head_rank()
        guesses = self.head_module(ctx.forward.config.vocab_size).apply(
            {"params": heads}, ctx.hidden)                                 # [B, K, V]
        top = jax.lax.top_k(guesses, int(rank.max()) + 1)[1].astype(jnp.int32)
        tokens = top[:, head, rank]
        return Proposal(tokens=tokens, valid=jnp.ones(tokens.shape, bool), q=None,
                        parents=self.parents), state

    def observe(self, heads, state, obs):
        return state

    def head_rank(self) -> tuple[np.ndarray, np.ndarray]:
        """Per node (``paths`` order): the head that guesses it (depth - 1) and the rank of
        its guess, numpy int32 [N] each."""
        head = np.asarray([len(p) - 1 for p in self.paths], np.int32)
        rank = np.asarray([p[-1] for p in self.paths], np.int32)
        return head, rank

    def head_module(self, vocab_size: int) -> nn.Module:
        """The heads' Flax module for a target with ``vocab_size`` tokens."""
        return MedusaHeads(self.num_heads, vocab_size, self.blocks)

    def init_heads(self, model_config, base_params, seed: int = 0):
        """Fresh head params for the base model (:func:`init_medusa_heads`)."""
        return init_medusa_heads(model_config, base_params, self.num_heads, self.blocks, seed)

    def teacher_forced_logits(self, heads, hidden, targets, base_params):
        """Training logits float32 [B, T, K, V]: head k at position t from the hidden state
        [B, T, D] there (Medusa heads do not read ``targets`` or ``base_params``)."""
        del targets, base_params
        return self.head_module(heads["head_0_out"]["kernel"].shape[-1]).apply(
            {"params": heads}, hidden)

    def abstract_heads(self, model_config):
        """The head params' shapes (``jax.ShapeDtypeStruct`` s) for ``model_config``."""
        d = model_config.hidden_size
        return jax.eval_shape(lambda: self.head_module(model_config.vocab_size).init(
            jax.random.key(0), jnp.zeros((1, d)))["params"])


def save_tree_heads(directory, drafter, model_config, params):
    """Write trained tree heads (a :class:`Medusa` or a subclass such as
    :class:`cadenza.decode.hydra.Hydra`) and their tree to a new head directory
    (:mod:`cadenza.decode.head_dir`, kind ``drafter.kind``), recording the base model's
    vocabulary and hidden sizes. Returns the directory's path."""
    from cadenza.decode.head_dir import save_head_dir

    meta = {"num_heads": drafter.num_heads, "blocks": drafter.blocks,
            "paths": [list(p) for p in drafter.paths],
            "vocab_size": model_config.vocab_size, "hidden_size": model_config.hidden_size}
    return save_head_dir(directory, drafter.kind, meta, params)


def load_tree_heads(directory, model_config, cls):
    """Read a head directory of ``cls.kind`` (``cls``: :class:`Medusa` or a subclass) for
    the target ``model_config``: returns ``(drafter, head params)``. Raises CadenzaError
    before compiling when the heads were trained on a model with another vocabulary or
    hidden size (the fields and both values named), or the directory holds another kind."""
    from cadenza.decode.head_dir import check_meta, load_head_dir, read_meta

    meta = read_meta(directory, cls.kind)
    check_meta(meta, {"vocab_size": model_config.vocab_size,
                      "hidden_size": model_config.hidden_size}, directory, "the target model")
    try:
        drafter = cls(paths=tuple(tuple(p) for p in meta["paths"]), blocks=int(meta["blocks"]),
                      heads=int(meta["num_heads"]))
    except ValueError as e:
        raise CadenzaError(f"invalid {cls.kind} tree: {e}", where=str(directory),
                           fix=f"write the directory with save_{cls.kind}_heads") from None
    return drafter, load_head_dir(directory, cls.kind, drafter.abstract_heads(model_config))[1]


def save_medusa_heads(directory, drafter: Medusa, model_config, params):
    """:func:`save_tree_heads` for Medusa heads (kind ``medusa``)."""
    return save_tree_heads(directory, drafter, model_config, params)


def load_medusa_heads(directory, model_config):
    """:func:`load_tree_heads` for a Medusa head directory: ``(Medusa drafter, head params)``."""
    return load_tree_heads(directory, model_config, Medusa)
