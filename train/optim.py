"""Optimizers and learning-rate schedules from :class:`~cadenza.train.config.TrainConfig`."""

import optax

from cadenza.train.config import TrainConfig


def make_schedule(train: TrainConfig) -> optax.Schedule:
    """Learning rate per update: linear warmup from 0 over ``warmup_steps`` (capped at
    ``steps``), then ``cosine`` / ``linear`` decay to ``learning_rate * min_lr_ratio`` at
    ``steps``, or ``constant``."""
    peak = train.learning_rate
    warmup = min(train.warmup_steps, train.steps)
    decay_steps = max(train.steps - warmup, 1)
    end = peak * train.min_lr_ratio
    if train.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=train.min_lr_ratio)
    elif train.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """The configured optimizer (adamw, adafactor, lion or sgd with momentum), preceded by
    global-norm clipping when ``grad_clip_norm > 0``, driven by :func:`make_schedule`."""
    lr = make_schedule(train)
    if train.optimizer == "adamw":
        opt = optax.adamw(lr, b1=train.b1, b2=train.b2, eps=train.eps,
                          weight_decay=train.weight_decay)
    elif train.optimizer == "adafactor":
        opt = optax.adafactor(lr, weight_decay_rate=train.weight_decay or None)
    elif train.optimizer == "lion":
        opt = optax.lion(lr, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay)
    else:
        # Coupled (L2-style) weight decay: added to the gradient, scaled by the lr.
        opt = optax.chain(optax.add_decayed_weights(train.weight_decay),
                          optax.sgd(lr, momentum=train.momentum or None))
    if train.grad_clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), opt)
    return opt
