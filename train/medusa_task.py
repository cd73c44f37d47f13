"""Training Medusa heads (Medusa-1): the base model frozen, only the heads learn.

Head k (0-based) reads the final hidden state at position t and predicts
token t + 2 + k (the base LM head predicts t + 1). The loss is
``sum_k 0.8**k * CE_k`` averaged over positions whose label exists; data
are token sequences (the base model's own generations or any corpus).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cadenza.decode.medusa import MedusaHeads, init_medusa_heads

HEAD_DECAY = 0.8


def medusa_loss(heads, hidden, tokens, num_heads: int, vocab_size: int, blocks: int = 1):
    """Weighted head cross-entropy. hidden [B, T, D] of ``tokens`` int32 [B, T] -> scalar."""
    logits = MedusaHeads(num_heads, vocab_size, blocks).apply({"params": heads}, hidden)
    total = 0.0
    t = tokens.shape[1]
    for k in range(num_heads):
        shift = k + 2
        if shift >= t:
            break
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :t - shift, k],
                                                             tokens[:, shift:])
        total = total + HEAD_DECAY ** k * ce.mean()
    return total


def train_medusa_heads(model, params, batches, *, num_heads: int, steps: int,
                       learning_rate: float = 1e-3, blocks: int = 1, seed: int = 0):
    """Train fresh heads (:func:`init_medusa_heads`) on ``batches`` of int32 [B, T] tokens.

    Returns ``(head params, list of per-step losses)``; ``params`` are not changed.
    """
    heads = init_medusa_heads(model.config, params, num_heads, blocks, seed)
    warmup = max(1, int(0.03 * steps))
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup,
                                                         max(steps, warmup + 1)))
    state = opt.init(heads)
    vocab = model.config.vocab_size

    @jax.jit
    def step(heads, state, tokens):
        hidden = jax.lax.stop_gradient(model.apply({"params": params}, tokens)[1])
        loss, grads = jax.value_and_grad(medusa_loss)(heads, hidden, tokens, num_heads, vocab,
                                                      blocks)
        updates, state = opt.update(grads, state, heads)
        return optax.apply_updates(heads, updates), state, loss

    losses = []
    for _ in range(steps):
        heads, state, loss = step(heads, state, jnp.asarray(np.asarray(next(batches)), jnp.int32))
        losses.append(float(loss))
    return heads, losses
