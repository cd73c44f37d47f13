"""The jitted train and eval steps: masked next-token loss, z-loss, gradient accumulation.

Batches are dicts of [B, T] arrays (see ``cadenza.train.data``): ``inputs``,
``targets``, ``positions``, ``segment_ids`` (int32) and ``loss_mask``
(float32, 1 = the token's loss counts). The loss is the mean over counted
tokens of the whole global batch (all microbatches together), so
accumulating M microbatches of B/M rows equals one batch of B rows; a batch
with no counted tokens has loss 0 and zero gradients. Extra keys a task needs
(e.g. LUD's ``lud_group`` [B, T]) are split into microbatches like the others and
passed through to ``task.apply`` unchanged. A task with its own ``loss`` (trained heads,
preference objectives) replaces the cross-entropy; its sums are averaged the same way,
and so are the extra metric sums it may return (reported under their own names).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cadenza.train.loss_shaping import SOURCE_KEY, balance_sources, mask_responses
from cadenza.train.state import TrainState
from cadenza.train.task import TrainTask

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def token_losses(logits, targets, loss_mask, z_loss: float = 0.0):
    """Summed losses of a microbatch.

    Args:
      logits: float [B, T, V] (read in float32); targets: int32 [B, T]; loss_mask: float
        [B, T].
      z_loss: weight of ``logsumexp(logits)**2`` (keeps the softmax normaliser near 1).

    Returns ``(objective_sum, ce_sum, count)``: float32 scalars, sums over counted
    tokens of cross-entropy + z-loss, of cross-entropy alone, and the token count.

    Differentiable in ``logits`` and ``loss_mask`` through a hand-written VJP: the backward
    pass keeps only the logits and the per-token ``logsumexp`` and writes the logits'
    gradient ``(softmax - onehot(target))`` times the token's weight in one pass, so no
    other [B, T, V] array (autodiff's saved ``exp(logits - max)``) is stored between the
    forward and backward passes. Same values as the plain formula within float32 rounding.
    """
    return _token_losses(logits.astype(jnp.float32), targets, loss_mask.astype(jnp.float32),
                         float(z_loss))


def _token_losses_fwd(logits, targets, mask, z_loss):
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = (lse - target_logit) * mask
    objective = ce + z_loss * jnp.square(lse) * mask if z_loss else ce
    return (objective.sum(), ce.sum(), mask.sum()), (logits, targets, mask, lse)


def _token_losses_bwd(z_loss, res, cotangents):
    logits, targets, mask, lse = res
    g_obj, g_ce, g_count = cotangents
    # d ce_sum / d logits = mask * (softmax - onehot(target)); the z-loss term adds
    # mask * 2 z lse * softmax to the objective's. The one-hot is an elementwise compare
    # (not a scatter), so a vocab-sharded d_logits stays sharded.
    g = g_obj + g_ce
    soft = mask * (g + 2.0 * z_loss * g_obj * lse if z_loss else g)
    onehot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
    d_logits = (jnp.exp(logits - lse[..., None]) * soft[..., None]
                - jnp.where(onehot, (mask * g)[..., None], 0.0))
    ce = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    d_mask = g * ce + g_count + (g_obj * z_loss * jnp.square(lse) if z_loss else 0.0)
    return d_logits, None, d_mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_losses(logits, targets, mask, z_loss):
    return _token_losses_fwd(logits, targets, mask, z_loss)[0]


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def _split_microbatches(batch: dict, microbatches: int) -> dict:
    """[B, T] -> [M, B/M, T]; microbatch i takes rows i, i+M, ... so every device keeps its
    contiguous block of rows (no resharding of a batch-sharded array)."""
    def split(x):
        b = x.shape[0]
        return x.reshape(b // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
    return {k: split(v) for k, v in batch.items()}


def _loss_fn(task: TrainTask, rules, z_loss: float, response_mask=(0.0, 0)):
    """``(trainable, frozen, mb, rng) -> (objective_sum, (ce_sum, count, extra))``; ``extra``:
    the task's extra metrics by name as sums over the microbatch's counted tokens (``{}``
    for most tasks): a task ``loss``'s fourth element, or ``apply_with_aux``'s auxiliary
    losses (per-token means times the count; each also added to the objective, weighted)."""
    def loss(trainable, frozen, mb, rng):
        if rng is not None and response_mask[0]:   # Masked Thought: training steps only
            mb = mask_responses(mb, jax.random.fold_in(rng, 0x6D61736B), *response_mask)
        with nn.logical_axis_rules(rules):
            if task.loss is not None:           # the task's own objective (e.g. heads)
                objective, ce, count, *extra = task.loss(trainable, frozen, mb, rng)
                return objective, (ce, count, extra[0] if extra else {})
            if task.apply_with_aux is not None:
                logits, aux = task.apply_with_aux(trainable, frozen, mb, rng)
            else:
                logits, aux = task.apply(trainable, frozen, mb, rng), {}
        objective, ce, count = token_losses(logits, mb["targets"], mb["loss_mask"], z_loss)
        for value, weight in aux.values():
            objective = objective + weight * value * count
        return objective, (ce, count, {k: v * count for k, (v, _) in aux.items()})
    return loss


def make_train_step(task: TrainTask, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, microbatches: int, z_loss: float, rules,
                    state_shardings: TrainState, frozen_shardings, batch_sharding,
                    metric_sharding, response_mask_prob: float = 0.0, response_mask_id: int = 0,
                    num_sources: int = 1):
    """The jitted step ``(state, frozen, batch) -> (state, metrics)``.

    Loss shaping (:mod:`cadenza.train.loss_shaping`): ``response_mask_prob > 0`` masks
    response input ids with ``response_mask_id`` (Masked Thought); a batch with
    ``source_ids`` gets the task-balanced loss over ``num_sources`` sources.

    ``state`` is donated (its buffers are reused for the new state); ``frozen`` is
    read only. Metrics (float32 scalars, replicated): ``loss`` (mean cross-entropy over
    counted tokens), ``objective`` (with z-loss), ``grad_norm`` (global norm before
    clipping), ``lr`` (the rate used by this update), ``tokens`` (counted tokens) and
    ``finite`` (1.0 when loss and gradient norm are finite), plus the extra metrics of the
    task (averaged like the loss: a task ``loss``'s extras; MoE: ``router_load_balancing``,
    ``router_z_loss``). Call it under ``jax.set_mesh(mesh)``.
    """
    loss_fn = _loss_fn(task, rules, z_loss, (response_mask_prob, response_mask_id))
    loss_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    param_shardings = state_shardings.params

    def step(state: TrainState, frozen, batch):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        if SOURCE_KEY in batch:
            batch = balance_sources(batch, num_sources)
        micro = _split_microbatches(batch, microbatches)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)

        def accumulate(carry, xs):
            grads, objective, ce, count, extra = carry
            mb, i = xs
            (obj, (c, n, e)), g = loss_and_grad(state.params, frozen, mb,
                                                jax.random.fold_in(step_rng, i))
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            extra = jax.tree.map(jnp.add, extra, e)
            return (grads, objective + obj, ce + c, count + n, extra), None

        first = jax.tree.map(lambda x: x[0], micro)
        extra_shapes = jax.eval_shape(loss_fn, state.params, frozen, first, step_rng)[1][2]
        init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0),
                jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), extra_shapes))
        (grads, objective, ce, count, extra), _ = jax.lax.scan(
            accumulate, init, (micro, jnp.arange(microbatches)))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss = ce / denom
        metrics = {"loss": loss, "objective": objective / denom, "grad_norm": grad_norm,
                   "lr": jnp.asarray(schedule(state.step), jnp.float32), "tokens": count,
                   "finite": (jnp.isfinite(loss) & jnp.isfinite(grad_norm)).astype(jnp.float32),
                   **{k: v / denom for k, v in extra.items()}}
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         rng=jax.random.key_data(rng))
        return new, metrics

    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                   out_shardings=(state_shardings, metric_sharding), donate_argnums=0)


def make_eval_step(task: TrainTask, *, rules, param_shardings, frozen_shardings, batch_sharding,
                   metric_sharding, num_sources: int = 1):
    """The jitted ``(trainable, frozen, batch) -> (ce_sum, count, extra_sums)`` over one eval
    batch (float32 scalars and a dict of them, empty unless the task's ``loss`` returns
    extra metrics; the eval loss is the ratio of the sums over batches; a batch with
    ``source_ids`` is task-balanced as in training)."""
    loss = _loss_fn(task, rules, 0.0)

    def evaluate(trainable, frozen, batch):
        if SOURCE_KEY in batch:
            batch = balance_sources(batch, num_sources)
        _, (ce, count, extra) = loss(trainable, frozen, batch, None)
        return ce, count, extra

    return jax.jit(evaluate, in_shardings=(param_shardings, frozen_shardings, batch_sharding),
                   out_shardings=metric_sharding)
