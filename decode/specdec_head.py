"""Adaptive draft length: stop a row's draft early when a rejection becomes likely.

Used as ``DraftModel(stop=StopRule(...))`` in :mod:`cadenza.decode.speculative`.
After sampling draft token s (1-based) with per-token acceptance estimates
a_i, the row stops drafting once ``1 - prod(a) > threshold`` (and
``s >= min_length``; ``gamma`` is the maximum). Verification is unchanged,
so output stays lossless; only the amount of drafting changes.

- ``kind="head"`` (SpecDec++, Huang et al. 2024): a_i = P_accept(d_i) from a
  small head on the draft's final hidden state when d_i is fed
  (:class:`AcceptHead`); after sampling d_s the product runs over i < s.
  Default threshold 0.3, lengths 2..20. Train it with ``cadenza train`` and
  ``train.task: specdec`` (:mod:`cadenza.train.specdec_task`); it is saved as a head
  directory (:func:`save_accept_head` / :func:`load_accept_head`).
- ``kind="confidence"`` (training-free): a_i = q_i(d_i), the draft's own
  probability of the token it proposed (the top probability when greedy);
  the product runs over i <= s.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

KINDS = ("head", "confidence")


class AcceptHead(nn.Module):
    """SpecDec++ acceptance head: ``blocks`` residual blocks h + SiLU(W h + b), then Linear(d -> 2).

    Input: draft hidden states [..., D]. Output: log-probabilities [..., 2] of
    (reject, accept).
    """

    blocks: int = 3

    @nn.compact
    def __call__(self, h):
        h = h.astype(jnp.float32)
        for i in range(self.blocks):
            h = h + nn.silu(nn.Dense(h.shape[-1], name=f"block_{i}")(h))
        return jax.nn.log_softmax(nn.Dense(2, name="out")(h), axis=-1)


def init_accept_head(hidden_size: int, key, blocks: int = 3):
    """Fresh :class:`AcceptHead` params for a draft model with ``hidden_size``."""
    return AcceptHead(blocks).init(key, jnp.zeros((1, hidden_size), jnp.float32))["params"]


@dataclasses.dataclass(frozen=True)
class StopRule:
    """When a row stops drafting (static; hashable)."""

    kind: str = "head"
    threshold: float = 0.3
    min_length: int = 2
    blocks: int = 3

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"StopRule.kind must be one of {KINDS}, got {self.kind!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError("StopRule.threshold must be in (0, 1)")
        if self.min_length < 1:
            raise ValueError("StopRule.min_length must be >= 1")

    def step(self, head_params, i, hidden, confidence, prod):
        """After sampling draft token ``s = i + 1``: update the running product, decide to stop.

        Args:
          head_params: :class:`AcceptHead` params (kind "head").
          i: 0-based index of the token just sampled (int or traced int32).
          hidden: draft hidden state [B, D] from feeding d_i (the previous draft
            token), or None for the first token (kind "head" then uses a = 1).
          confidence: float32 [B] log q(d_s) of the token just sampled.
          prod: float32 [B] the product so far.
        Returns ``(prod, stop bool [B])``.
        """
        if self.kind == "head":
            factor = (jnp.ones_like(prod) if hidden is None
                      else jnp.exp(AcceptHead(self.blocks).apply({"params": head_params},
                                                                  hidden)[..., 1]))
        else:
            factor = jnp.exp(confidence)
        prod = prod * factor
        return prod, (i + 1 >= self.min_length) & (1.0 - prod > self.threshold)


def save_accept_head(directory, params, hidden_size: int, blocks: int = 3):
    """Write a trained head to a new head directory (:mod:`cadenza.decode.head_dir`, kind
    ``accept``) recording ``blocks`` and the draft model's ``hidden_size``."""
    from cadenza.decode.head_dir import save_head_dir

    return save_head_dir(directory, "accept", {"blocks": blocks, "hidden_size": hidden_size},
                         params)


def load_accept_head(directory, draft_config):
    """Read a head directory written by :func:`save_accept_head` for the draft model
    ``draft_config``: returns ``(params, blocks)``. Raises CadenzaError (before compiling)
    if it was trained on a draft with another hidden size, naming both."""
    from cadenza.decode.head_dir import check_meta, load_head_dir, read_meta

    meta = read_meta(directory, "accept")
    check_meta(meta, {"hidden_size": draft_config.hidden_size}, directory, "the draft model")
    blocks = int(meta["blocks"])
    abstract = jax.eval_shape(
        lambda: init_accept_head(draft_config.hidden_size, jax.random.key(0), blocks))
    return load_head_dir(directory, "accept", abstract)[1], blocks
