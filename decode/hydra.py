"""Hydra: tree heads that read the tokens already drafted, a drafter of the speculative round.

Heads (:class:`HydraHeads`): like Medusa's (:mod:`cadenza.decode.medusa`), head k
guesses the token k + 1 places after the pending token y from the target's final
hidden state h where it produced y, but head k also reads the input embeddings
(the target's own table) of the k + 1 tokens before its guess: y and the k
tokens drafted on the path to it (sequentially dependent, Ankner et al., 2024)::

    x = h + W_in [e(y); e(d_1); ..; e(d_k)]        (W_in zero-initialised)
    x = x + SiLU(W x + b)                          per block (W, b zero-initialised)
    logits_k = x @ W_out                           (a copy of the LM head)

so a fresh head reproduces the base logits. The embedding table stays the
target's (draft params are ``(head params, target embedding [V, D])``,
:func:`hydra_draft_params`). Train them with ``cadenza train`` and
``train.task: hydra`` (:mod:`cadenza.train.hydra_task`; teacher forcing: the
corpus' tokens stand in for the drafts); they are saved as a head directory
(kind ``hydra``) that records the tree.

Tree: the static :class:`Medusa` tree (``paths``); a node's token is the
``rank``-th best guess of head ``depth - 1`` evaluated on its parent's path.
The heads run once per depth (all parents at that depth together), after the
target's single forward per round; verification, acceptance and compaction are
the speculative round's (:mod:`cadenza.decode.speculative`).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from cadenza.decode.medusa import Medusa, lm_head_copies, load_tree_heads, save_tree_heads
from cadenza.decode.speculative import Proposal


class HydraHeads(nn.Module):
    """``num_heads`` heads: hidden [..., D] and path embeddings [..., n, D] -> logits float32
    [..., K, vocab] of heads ``only`` (one index) or all; head k reads ``embeds[..., :k + 1]``
    (so ``n`` must exceed the largest head index computed)."""

    num_heads: int
    vocab_size: int
    blocks: int = 1

    @nn.compact
    def __call__(self, h, embeds, only: int | None = None):
        h, embeds = h.astype(jnp.float32), embeds.astype(jnp.float32)
        d = h.shape[-1]
        outs = []
        for k in range(self.num_heads) if only is None else (only,):
            path = embeds[..., :k + 1, :].reshape(*embeds.shape[:-2], (k + 1) * d)
            x = h + nn.Dense(d, kernel_init=nn.initializers.zeros, name=f"head_{k}_in")(path)
            for i in range(self.blocks):
                x = x + nn.silu(nn.Dense(d, kernel_init=nn.initializers.zeros,
                                         name=f"head_{k}_block_{i}")(x))
            outs.append(nn.Dense(self.vocab_size, use_bias=False, name=f"head_{k}_out")(x))
        return jnp.stack(outs, axis=-2)


def target_embedding(params):
    """The target's input embedding table [V, D] from its params (a PeftModel's
    ``(trainable, frozen)`` pair: the frozen base's)."""
    base = params[1] if isinstance(params, tuple) else params
    return base["embed"]["embedding"]


def hydra_draft_params(heads, target_params):
    """The draft params Hydra decodes with: ``(heads, the target's embedding table)``."""
    return heads, target_embedding(target_params)


def path_embeddings(table, targets, n: int):
    """Teacher-forced path embeddings float32 [B, T, n, D]: ``[.., j]`` at position t is the
    embedding of ``targets[t + j]`` (zeros past the end; those labels are never counted)."""
    t = targets.shape[1]
    padded = jnp.pad(targets, ((0, 0), (0, n)))
    ids = jnp.stack([padded[:, j:j + t] for j in range(n)], axis=2)
    return jnp.asarray(table, jnp.float32)[ids]


@dataclasses.dataclass(frozen=True)
class Hydra(Medusa):
    """Hydra drafter: the :class:`Medusa` tree and head count, heads of
    :class:`HydraHeads`. Draft params: :func:`hydra_draft_params`."""

    name: str = "hydra"
    kind = "hydra"

    def head_module(self, vocab_size: int) -> nn.Module:
        return HydraHeads(self.num_heads, vocab_size, self.blocks)

    def abstract_heads(self, model_config):
        d, k = model_config.hidden_size, self.num_heads
        return jax.eval_shape(lambda: self.head_module(model_config.vocab_size).init(
            jax.random.key(0), jnp.zeros((1, d)), jnp.zeros((1, k, d)))["params"])

    def init_heads(self, model_config, base_params, seed: int = 0):
        """Fresh heads: zero input projections and blocks, LM-head copies."""
        d, k = model_config.hidden_size, self.num_heads
        params = self.head_module(model_config.vocab_size).init(
            jax.random.key(seed), jnp.zeros((1, d)), jnp.zeros((1, k, d)))["params"]
        return {**params, **lm_head_copies(base_params, k)}

    def teacher_forced_logits(self, heads, hidden, targets, base_params):
        """Training logits float32 [B, T, K, V]: head k at position t reads the hidden state
        there and the embeddings of ``targets[t .. t + k]`` (y and the true next tokens)."""
        vocab = heads["head_0_out"]["kernel"].shape[-1]
        embeds = path_embeddings(target_embedding(base_params), targets, self.num_heads)
        return self.head_module(vocab).apply({"params": heads}, hidden, embeds)

    def propose(self, draft_params, state, ctx):
        """Node tokens depth by depth: head ``depth - 1`` on each parent's path (point
        masses)."""
        heads, table = draft_params
        module = self.head_module(ctx.forward.config.vocab_size)
        parents, tokens = self.parents, {}
        for depth in range(1, self.gamma + 1):
            nodes = [i for i, p in enumerate(self.paths) if len(p) == depth]
            owners = sorted({parents[i] for i in nodes})
            paths = []
            for p in owners:          # the tokens from the pending one down to parent p
                chain, j = [], p
                while j >= 0:
                    chain.append(tokens[j])
                    j = parents[j]
                paths.append(jnp.stack([ctx.pending] + chain[::-1], axis=1))    # [B, depth]
            ids = jnp.stack(paths, axis=1)                                      # [B, P, depth]
            h = jnp.broadcast_to(ctx.hidden[:, None, :],
                                 (ids.shape[0], len(owners), ctx.hidden.shape[-1]))
            logits = module.apply({"params": heads}, h, jnp.asarray(table)[ids],
                                  only=depth - 1)[..., 0, :]                    # [B, P, V]
            rank = max(self.paths[i][-1] for i in nodes) + 1
            top = jax.lax.top_k(logits, rank)[1].astype(jnp.int32)              # [B, P, r]
            for i in nodes:
                tokens[i] = top[:, owners.index(parents[i]), self.paths[i][-1]]
        out = jnp.stack([tokens[i] for i in range(len(self.paths))], axis=1)
        return Proposal(tokens=out, valid=jnp.ones(out.shape, bool), q=None,
                        parents=parents), state


def save_hydra_heads(directory, drafter: Hydra, model_config, params):
    """:func:`~cadenza.decode.medusa.save_tree_heads` for Hydra heads (kind ``hydra``)."""
    return save_tree_heads(directory, drafter, model_config, params)


def load_hydra_heads(directory, model_config):
    """:func:`~cadenza.decode.medusa.load_tree_heads` for a Hydra head directory:
    ``(Hydra drafter, head params)`` (pair them with the target's embedding table,
    :func:`hydra_draft_params`)."""
    return load_tree_heads(directory, model_config, Hydra)
