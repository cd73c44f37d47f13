"""The jitted train and eval steps: masked next-token loss, z-loss, gradient accumulation.

Batches are dicts of [B, T] arrays (see ``cadenza.train.data``): ``inputs``,
``targets``, ``positions``, ``segment_ids`` (int32) and ``loss_mask``
(float32, 1 = the token's loss counts). The loss is the mean over counted
tokens of the whole global batch (all microbatches together), so
accumulating M microbatches of B/M rows equals one batch of B rows; a batch
with no counted tokens has loss 0 and zero gradients. Extra keys a task needs
(e.g. LUD's ``lud_group`` [B, T]) are split into microbatches like the others and
passed through to ``task.apply`` unchanged. A task with its own ``loss`` (trained heads)
replaces the cross-entropy; its sums are averaged the same way.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cadenza.train.state import TrainState
from cadenza.train.task import TrainTask

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def token_losses(logits, targets, loss_mask, z_loss: float = 0.0):
    """Summed losses of a microbatch.

    Args:
      logits: float32 [B, T, V]; targets: int32 [B, T]; loss_mask: float [B, T].
      z_loss: weight of ``logsumexp(logits)**2`` (keeps the softmax normaliser near 1).

    Returns ``(objective_sum, ce_sum, count)``: float32 scalars, sums over counted
    tokens of cross-entropy + z-loss, of cross-entropy alone, and the token count.
    """
    logits = logits.astype(jnp.float32)
    mask = loss_mask.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = (lse - target_logit) * mask
    objective = ce + z_loss * jnp.square(lse) * mask if z_loss else ce
    return objective.sum(), ce.sum(), mask.sum()


def _split_microbatches(batch: dict, microbatches: int) -> dict:
    """[B, T] -> [M, B/M, T]; microbatch i takes rows i, i+M, ... so every device keeps its
    contiguous block of rows (no resharding of a batch-sharded array)."""
    def split(x):
        b = x.shape[0]
        return x.reshape(b // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
    return {k: split(v) for k, v in batch.items()}


def _loss_fn(task: TrainTask, rules, z_loss: float):
    def loss(trainable, frozen, mb, rng):
        with nn.logical_axis_rules(rules):
            if task.loss is not None:           # the task's own objective (e.g. heads)
                objective, ce, count = task.loss(trainable, frozen, mb, rng)
                return objective, (ce, count)
            logits = task.apply(trainable, frozen, mb, rng)
        objective, ce, count = token_losses(logits, mb["targets"], mb["loss_mask"], z_loss)
        return objective, (ce, count)
    return loss


def make_train_step(task: TrainTask, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, microbatches: int, z_loss: float, rules,
                    state_shardings: TrainState, frozen_shardings, batch_sharding,
                    metric_sharding):
    """The jitted step ``(state, frozen, batch) -> (state, metrics)``.

    ``state`` is donated (its buffers are reused for the new state); ``frozen`` is
    read only. Metrics (float32 scalars, replicated): ``loss`` (mean cross-entropy over
    counted tokens), ``objective`` (with z-loss), ``grad_norm`` (global norm before
    clipping), ``lr`` (the rate used by this update), ``tokens`` (counted tokens) and
    ``finite`` (1.0 when loss and gradient norm are finite). Call it under
    ``jax.set_mesh(mesh)``.
    """
    loss_and_grad = jax.value_and_grad(_loss_fn(task, rules, z_loss), has_aux=True)
    param_shardings = state_shardings.params

    def accumulated(params, frozen, batch, step_rng):
        """Summed float32 gradients, objective, cross-entropy and count over microbatches."""
        micro = _split_microbatches(batch, microbatches)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)

        def accumulate(carry, xs):
            grads, objective, ce, count = carry
            mb, i = xs
            (obj, (c, n)), g = loss_and_grad(params, frozen, mb, jax.random.fold_in(step_rng, i))
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (grads, objective + obj, ce + c, count + n), None

        init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
        (grads, objective, ce, count), _ = jax.lax.scan(
            accumulate, init, (micro, jnp.arange(microbatches)))
        return grads, objective, ce, count

    def step(state: TrainState, frozen, batch):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        if microbatches == 1:   # no accumulation loop: no zeroed buffers, no loop copies
            (objective, (ce, count)), grads = loss_and_grad(
                state.params, frozen, batch, jax.random.fold_in(step_rng, 0))
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        else:
            grads, objective, ce, count = accumulated(state.params, frozen, batch, step_rng)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss = ce / denom
        metrics = {"loss": loss, "objective": objective / denom, "grad_norm": grad_norm,
                   "lr": jnp.asarray(schedule(state.step), jnp.float32), "tokens": count,
                   "finite": (jnp.isfinite(loss) & jnp.isfinite(grad_norm)).astype(jnp.float32)}
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         rng=jax.random.key_data(rng))
        return new, metrics

    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                   out_shardings=(state_shardings, metric_sharding), donate_argnums=0)


def make_eval_step(task: TrainTask, *, rules, param_shardings, frozen_shardings, batch_sharding,
                   metric_sharding):
    """The jitted ``(trainable, frozen, batch) -> (ce_sum, count)`` over one eval batch
    (float32 scalars; the eval loss is the ratio of their sums over batches)."""
    loss = _loss_fn(task, rules, 0.0)

    def evaluate(trainable, frozen, batch):
        _, (ce, count) = loss(trainable, frozen, batch, None)
        return ce, count

    return jax.jit(evaluate, in_shardings=(param_shardings, frozen_shardings, batch_sharding),
                   out_shardings=metric_sharding)
