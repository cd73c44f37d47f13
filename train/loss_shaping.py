"""Shaping the SFT loss: Masked Thought input masking and a task-balanced loss.

- :func:`mask_responses` (``data.response_mask_prob``, Masked Thought): in training
  steps, each response token *as an input* is replaced by ``data.response_mask_id``
  with probability p; targets and the loss mask are unchanged, prompts are never touched
  (an input at position t belongs to the response when position t - 1 is a trained
  target of the same segment).
- :func:`balance_sources` (``data.balance: sources``): the loss becomes the mean over
  the sources of a mixture of each source's token-mean loss. It rescales ``loss_mask``
  over the whole global batch so that the masked-mean loss of the step *is* that
  quantity and the count of counted tokens is unchanged; with one source every weight is
  exactly 1 (today's loss, bit for bit).
"""

import jax
import jax.numpy as jnp

SOURCE_KEY = "source_ids"


def response_inputs(loss_mask, segment_ids):
    """bool [B, T]: inputs that are response tokens (the previous position is a trained
    target of the same segment)."""
    prev_trained = jnp.pad(loss_mask[:, :-1] > 0, ((0, 0), (1, 0)))
    same = jnp.pad(segment_ids[:, 1:] == segment_ids[:, :-1], ((0, 0), (1, 0)))
    return prev_trained & same & (segment_ids > 0)


def mask_responses(batch: dict, rng, prob: float, mask_id: int) -> dict:
    """``batch`` with each response input id (:func:`response_inputs`) replaced by
    ``mask_id`` with probability ``prob`` (independently, from ``rng``); ``prob == 0``
    returns ``batch`` itself. Other keys are unchanged."""
    if not prob:
        return batch
    hit = response_inputs(batch["loss_mask"], batch["segment_ids"])
    hit &= jax.random.bernoulli(rng, prob, hit.shape)
    return {**batch, "inputs": jnp.where(hit, jnp.int32(mask_id), batch["inputs"])}


def balance_sources(batch: dict, num_sources: int) -> dict:
    """``batch`` (the global batch, with int32 [B, T] ``source_ids``) with ``loss_mask``
    reweighted so that ``sum(ce * mask) / sum(mask)`` is the mean over the sources present
    of each source's token-mean cross-entropy; ``sum(mask)`` is unchanged. ``source_ids``
    is dropped (the model does not read it)."""
    mask = batch["loss_mask"].astype(jnp.float32)
    src = batch[SOURCE_KEY]
    onehot = jax.nn.one_hot(src, num_sources, dtype=jnp.float32) * mask[..., None]
    per_source = onehot.sum(axis=(0, 1))                     # counted tokens per source
    present = jnp.sum(per_source > 0)
    total = per_source.sum()
    scale = jnp.where(per_source > 0, total / jnp.maximum(per_source * present, 1.0), 0.0)
    out = {k: v for k, v in batch.items() if k != SOURCE_KEY}
    out["loss_mask"] = mask * scale[src]
    return out
