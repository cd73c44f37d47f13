"""Training the SpecDec++ acceptance head (:class:`cadenza.decode.adaptive.AcceptHead`).

Data [SpecDec++, code]: for each position t of a token sequence x, a draft
token d ~ q(. | x_<t) is drawn given the true prefix and labelled with the
soft acceptance probability ``y = min(1, p(d | x_<t) / q(d | x_<t))`` (p =
target, q = draft, both raw). The head's input is the frozen draft's final
hidden state where d is *fed*: the sequence with tokens swapped for their
draft tokens, except a random 15% kept (no loss there).

Loss: ``-sum[w (1 - y) log P_reject + y log P_accept] / sum[w (1 - y) + y]``
with w = 6; AdamW with 3% warm-up and cosine decay. Only the head trains.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cadenza.decode.adaptive import AcceptHead, init_accept_head

KEEP_FRACTION = 0.15
REJECT_WEIGHT = 6.0


def specdec_examples(target, target_params, draft, draft_params, tokens, key):
    """tokens int32 [B, T] -> (inputs int32 [B, T], labels float32 [B, T], mask float32 [B, T]).

    ``inputs[:, t]`` (t >= 1) is the draft token for position t (or the true
    token, kept with probability 0.15); ``labels`` its soft acceptance
    probability; ``mask`` is 1 where a draft token was swapped in.
    """
    p = jax.nn.log_softmax(target.apply({"params": target_params}, tokens)[0][:, :-1])
    q = jax.nn.log_softmax(draft.apply({"params": draft_params}, tokens)[0][:, :-1])
    k_draw, k_keep = jax.random.split(key)
    d = jax.random.categorical(k_draw, q).astype(jnp.int32)
    p_d = jnp.take_along_axis(p, d[..., None], -1)[..., 0]
    q_d = jnp.take_along_axis(q, d[..., None], -1)[..., 0]
    y = jnp.minimum(1.0, jnp.exp(p_d - q_d))
    keep = jax.random.bernoulli(k_keep, KEEP_FRACTION, d.shape)
    inputs = tokens.at[:, 1:].set(jnp.where(keep, tokens[:, 1:], d))
    pad = jnp.zeros_like(tokens[:, :1], jnp.float32)
    labels = jnp.concatenate([pad, y], axis=1)
    mask = jnp.concatenate([pad, (~keep).astype(jnp.float32)], axis=1)
    return inputs, labels, mask


def head_loss(head_params, hidden, labels, mask, blocks: int = 3):
    """SpecDec++ weighted BCE of the head on hidden [B, T, D] against soft labels [B, T]."""
    logp = AcceptHead(blocks).apply({"params": head_params}, hidden)
    w = REJECT_WEIGHT * (1.0 - labels) * mask
    a = labels * mask
    return -jnp.sum(w * logp[..., 0] + a * logp[..., 1]) / jnp.maximum(jnp.sum(w + a), 1e-6)


def train_accept_head(target, target_params, draft, draft_params, batches, *, steps: int,
                      learning_rate: float = 1e-3, seed: int = 0, blocks: int = 3):
    """Train a fresh head for ``steps`` updates on ``batches`` (an iterator of int32 [B, T]).

    Target and draft stay frozen. Returns ``(head params, list of per-step losses)``.
    """
    key = jax.random.key(seed)
    head = init_accept_head(draft.config.hidden_size, key, blocks)
    warmup = max(1, int(0.03 * steps))
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup,
                                                         max(steps, warmup + 1)))
    state = opt.init(head)

    @jax.jit
    def step(head, state, tokens, key):
        inputs, labels, mask = specdec_examples(target, target_params, draft, draft_params,
                                                tokens, key)
        hidden = draft.apply({"params": draft_params}, inputs)[1]
        loss, grads = jax.value_and_grad(head_loss)(head, hidden, labels, mask, blocks)
        updates, state = opt.update(grads, state, head)
        return optax.apply_updates(head, updates), state, loss

    losses = []
    for i in range(steps):
        tokens = jnp.asarray(np.asarray(next(batches)), jnp.int32)
        head, state, loss = step(head, state, tokens, jax.random.fold_in(key, i))
        losses.append(float(loss))
    return head, losses
