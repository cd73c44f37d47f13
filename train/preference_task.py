"""Preference tuning as a :class:`~cadenza.train.task.TrainTask`: DPO and ORPO.

``cadenza train`` with ``train.task: dpo`` or ``orpo`` on ``data.format: preference``
trains the model (or, with ``peft.method`` set, its adapters) through ``fit``. Batches
hold whole pairs (see :mod:`cadenza.train.data.pipeline`): pair ``k`` of a row is
segment ``2k - 1`` (prompt + chosen) and ``2k`` (prompt + rejected); a side's log-prob
is the sum of its trained (response) tokens' log-probs. The loss is averaged over the
pairs of the global batch (microbatches accumulate exactly, like the token loss).

DPO (``beta``, ``loss``; section ``train.preference``): with ``m = (log pi(chosen) -
log pi(rejected)) - (log ref(chosen) - log ref(rejected))`` the pair loss is
``-log sigmoid(beta m)`` (``sigmoid``), ``(m' - 1/(2 beta))**2`` with length-averaged
log-probs (``ipo``) or ``relu(1 - beta m)`` (``hinge``). The reference is the frozen
``train.init_from`` model: under full fine-tuning a frozen copy of it; under PEFT the
frozen base itself, run with the adapters off (no second copy of the weights). Rewards:
``beta * (log pi - log ref)`` of each side.

ORPO (``orpo_lambda``, no reference): the chosen response's length-averaged NLL plus
``orpo_lambda * -log sigmoid(log odds(chosen) - log odds(rejected))`` with
``odds(y) = p / (1 - p)`` of the length-averaged probability ``p``. Rewards: the sides'
length-averaged log-probs.

Metrics (train and eval, averaged over pairs): ``reward_accuracy`` (1 when the chosen
reward is higher, 1/2 on a tie, else 0), ``chosen_reward``, ``rejected_reward``,
``reward_margin``; ORPO adds ``nll`` and ``log_odds_ratio``.
"""

import jax
import jax.numpy as jnp

from cadenza.errors import ConfigError
from cadenza.train.task import TrainTask


def pair_logps(logits, batch):
    """Summed response log-probs of every pair slot of a microbatch.

    Args:
      logits: float [B, T, V]; batch: ``targets``, ``loss_mask``, ``segment_ids`` [B, T] in
        the pair layout (segment ``2k - 1`` chosen, ``2k`` rejected).
    Returns ``(chosen, rejected, chosen_tokens, rejected_tokens)``: float32 [B, T // 2]
    sums of log p(target) over each side's counted tokens (0 for absent pairs) and the
    counts. A pair slot is real when both counts are positive.
    """
    logits = logits.astype(jnp.float32)
    b, t = batch["targets"].shape
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    ids = (jnp.arange(b)[:, None] * (t + 1) + batch["segment_ids"]).reshape(-1)

    def per_segment(x):
        sums = jax.ops.segment_sum(x.reshape(-1), ids, num_segments=b * (t + 1))
        sums = sums.reshape(b, t + 1)
        return sums[:, 1::2][:, :t // 2], sums[:, 2::2][:, :t // 2]

    chosen, rejected = per_segment((target - lse) * mask)
    n_chosen, n_rejected = per_segment(mask)
    return chosen, rejected, n_chosen, n_rejected


def _accuracy(chosen_reward, rejected_reward):
    return jnp.where(chosen_reward > rejected_reward, 1.0,
                     jnp.where(chosen_reward == rejected_reward, 0.5, 0.0))


def _sums(valid, loss, chosen_reward, rejected_reward, **extra):
    """``(objective_sum, loss_sum, count, metric sums)`` over the real pairs."""
    w = valid.astype(jnp.float32)
    total = jnp.sum(loss * w)
    metrics = {"reward_accuracy": _accuracy(chosen_reward, rejected_reward),
               "chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
               "reward_margin": chosen_reward - rejected_reward, **extra}
    return total, total, jnp.sum(w), {k: jnp.sum(v * w) for k, v in metrics.items()}


def dpo_loss(policy, reference, beta: float, loss: str = "sigmoid"):
    """DPO over pair slots (module docstring).

    Args:
      policy / reference: :func:`pair_logps` of the trained model and of the reference.
      beta: the log-ratio scale; loss: ``sigmoid`` | ``ipo`` | ``hinge``.
    Returns ``(objective_sum, loss_sum, pair_count, metric_sums)``, float32 scalars.
    """
    pc, pr, nc, nr = policy
    rc, rr = reference[0], reference[1]
    valid = (nc > 0) & (nr > 0)
    margin = (pc - pr) - (rc - rr)
    if loss == "sigmoid":
        per_pair = jax.nn.softplus(-beta * margin)
    elif loss == "hinge":
        per_pair = jax.nn.relu(1.0 - beta * margin)
    else:
        nc1, nr1 = jnp.maximum(nc, 1.0), jnp.maximum(nr, 1.0)
        averaged = (pc / nc1 - pr / nr1) - (rc / nc1 - rr / nr1)
        per_pair = jnp.square(averaged - 1.0 / (2.0 * beta))
    return _sums(valid, per_pair, beta * (pc - rc), beta * (pr - rr))


def orpo_loss(policy, orpo_lambda: float):
    """ORPO over pair slots (module docstring). ``policy``: :func:`pair_logps`.
    Returns ``(objective_sum, loss_sum, pair_count, metric_sums)``, float32 scalars."""
    pc, pr, nc, nr = policy
    valid = (nc > 0) & (nr > 0)
    mc, mr = pc / jnp.maximum(nc, 1.0), pr / jnp.maximum(nr, 1.0)   # mean log-probs < 0

    def log_odds(m):   # log(p / (1 - p)) with p = exp(m), m < 0
        return m - jnp.log(-jnp.expm1(jnp.minimum(m, -1e-7)))

    ratio = log_odds(mc) - log_odds(mr)
    nll = -mc
    per_pair = nll + orpo_lambda * jax.nn.softplus(-ratio) if orpo_lambda else nll
    return _sums(valid, per_pair, mc, mr, nll=nll, log_odds_ratio=ratio)


def _reference_logits(config):
    """``(frozen, batch) -> logits`` of the DPO reference, and whether it needs its own
    frozen copy (full fine-tuning) or reads the PEFT task's frozen base."""
    from cadenza.models import Transformer

    model = Transformer(config.model)

    def plain(params, batch):
        return model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"])[0]

    if config.peft.method in ("none", "partial", "lisa", "hft"):   # the whole model trains
        return (lambda frozen, batch: plain(frozen["reference"], batch)), True
    if config.peft.method != "qlora":   # the frozen base params are complete
        return (lambda frozen, batch: plain(frozen["task"]["params"], batch)), False
    from cadenza.train.peft.model import build

    pm = build(config.model, config.peft)

    def adapters_off(frozen, batch):   # LoRA with B = 0 is the (quantised) base exactly
        off = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), pm.abstract_trainable())
        return pm.apply(off, frozen["task"], batch["inputs"], positions=batch["positions"],
                        segment_ids=batch["segment_ids"])[0]
    return adapters_off, False


def preference_task(config) -> TrainTask:
    """The DPO / ORPO task of ``config`` (``train.task``, ``train.preference``) around the
    full-model task or, with ``peft.method`` set, the PEFT or selective task (base
    ``train.init_from``). The frozen tree is ``{"task": the inner task's frozen tree}``,
    plus ``"reference"`` (the ``init_from`` params) for DPO when the whole model trains.

    Raises:
      ConfigError: the data are not preference pairs, or preference pairs under another
        task, or prefix / prompt tuning (which change the sequence layout).
    """
    import dataclasses

    from cadenza.train.task import full_model_task

    kind, pref = config.train.task, config.train.preference
    if kind not in ("dpo", "orpo"):
        raise ConfigError(f"data.format=preference holds preference pairs but train.task="
                          f"{kind} does not train on them", where="train.task",
                          fix="set train.task=dpo or train.task=orpo")
    if not config.data.is_preference:
        raise ConfigError(f"train.task={kind} trains on preference pairs but the data are "
                          f"{sorted({s.format for s in config.data.sources()})}",
                          where="data.format",
                          fix="set data.format=preference and data.path to the pairs")
    if config.peft.method in ("prefix", "prompt"):
        raise ConfigError(f"peft.method={config.peft.method} changes the sequence layout and "
                          "does not combine with preference pairs", where="peft.method",
                          fix="use lora, dora, qlora or ia3, or full fine-tuning")
    alpha = config.data.neftune_alpha
    if config.peft.method in ("partial", "lisa", "hft"):
        from cadenza.train.peft.selective import selective_task

        inner = selective_task(config, neftune_alpha=alpha)
    elif config.peft.method != "none":
        from cadenza.train.peft.task import peft_task

        inner = peft_task(config, neftune_alpha=alpha)
    else:
        inner = full_model_task(config.model, neftune_alpha=alpha,
                                init_from=config.train.init_from)

    def policy_logps(trainable, frozen, batch, rng):
        return pair_logps(inner.apply(trainable, frozen["task"], batch, rng), batch)

    if kind == "orpo":
        def loss(trainable, frozen, batch, rng):
            return orpo_loss(policy_logps(trainable, frozen, batch, rng), pref.orpo_lambda)
        own_copy, reference = False, None
    else:
        reference, own_copy = _reference_logits(config)

        def loss(trainable, frozen, batch, rng):
            ref = pair_logps(jax.lax.stop_gradient(reference(frozen, batch)), batch)
            return dpo_loss(policy_logps(trainable, frozen, batch, rng), ref, pref.beta,
                            pref.loss)

    def load_frozen(mesh, rules):
        from cadenza.train.task import load_base_params

        frozen = {"task": inner.load_frozen(mesh, rules)}
        if own_copy:
            frozen["reference"] = load_base_params(config.model, config.train.init_from,
                                                   mesh, rules)
        return frozen

    def abstract_frozen(mesh, rules):
        from cadenza.train.head_fit import abstract_frozen_params

        frozen = {"task": inner.abstract_frozen(mesh, rules)}
        if own_copy:
            frozen["reference"] = abstract_frozen_params(config.model, mesh, rules)
        return frozen

    def apply(trainable, frozen, batch, rng):
        return inner.apply(trainable, frozen["task"], batch, rng)

    return dataclasses.replace(
        inner, load_frozen=load_frozen, abstract_frozen=abstract_frozen, apply=apply,
        loss=loss,
        export=lambda trainable, frozen: inner.export(trainable, frozen["task"]))
