"""Training Medusa heads (Medusa-1): the base model frozen, only the heads learn.

Head k (0-based) reads the final hidden state at position t and predicts the
token at t + 2 + k (the base LM head predicts t + 1), i.e. ``targets[t + 1 + k]``
of a training batch, where that is in the same segment and counted. The loss is
``sum_k decay**k * CE_k`` summed over positions, averaged over the positions
where head 0 has a label. Data: any batches of the data pipeline (the base
model's own generations or a corpus).

``cadenza train`` with ``train.task: medusa`` (section ``train.medusa``, base
``train.init_from``) runs :func:`medusa_task` through ``fit`` and writes the
head directory (:func:`cadenza.decode.medusa.save_medusa_heads`) to
``<output_dir>/adapters``; :func:`train_medusa_heads` does the same from Python
on in-memory token arrays. :func:`tree_heads_task` and :func:`train_tree_heads` are the
same for any tree drafter's heads (Hydra: :mod:`cadenza.train.hydra_task`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from cadenza.decode.medusa import DEFAULT_PATHS, Medusa, load_tree_heads, save_tree_heads
from cadenza.train.head_fit import (
    abstract_frozen_params,
    fit_on_tokens,
    frozen_params,
    param_count,
)
from cadenza.train.task import TrainTask, donatable_copy


def medusa_drafter(medusa) -> Medusa:
    """The :class:`Medusa` drafter a ``train.medusa`` section describes (its tree, or the
    default tree cut to ``num_heads``)."""
    paths = [tuple(p) for p in medusa.tree] or [p for p in DEFAULT_PATHS
                                                 if len(p) <= medusa.num_heads]
    return Medusa(paths=tuple(paths), blocks=medusa.blocks, heads=medusa.num_heads)


def medusa_loss(logits, batch, decay: float = 0.8):
    """Weighted head cross-entropy of one microbatch.

    Args:
      logits: float32 [B, T, K, V] the heads' logits at every position.
      batch: ``targets``, ``loss_mask``, ``segment_ids`` [B, T] (see :mod:`cadenza.train.step`).
    Returns ``(objective_sum, count)``: sum over heads k and positions t of
    ``decay**k * CE_k(t)`` where ``targets[t + 1 + k]`` is counted and in t's segment,
    and the number of positions where head 0 has such a label.
    """
    targets, mask, seg = batch["targets"], batch["loss_mask"], batch["segment_ids"]
    t, num_heads = logits.shape[1], logits.shape[2]
    total, count = jnp.float32(0.0), jnp.float32(0.0)
    for k in range(min(num_heads, t - 1)):
        s = k + 1
        ok = (mask[:, s:] > 0) & (seg[:, s:] == seg[:, :-s]) & (seg[:, :-s] > 0)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :t - s, k],
                                                             targets[:, s:])
        total = total + decay ** k * jnp.sum(jnp.where(ok, ce, 0.0))
        if k == 0:
            count = jnp.sum(ok.astype(jnp.float32))
    return total, count


def tree_heads_task(model_config, drafter, decay: float, base) -> TrainTask:
    """Tree heads (``drafter``: a :class:`Medusa` or a subclass such as
    :class:`cadenza.decode.hydra.Hydra`) on a frozen model.

    Args:
      model_config: the base model's ModelConfig.
      drafter: the drafter whose heads train (its ``init_heads``, ``teacher_forced_logits``,
        ``abstract_heads``); its tree is saved with them.
      decay: head k's cross-entropy weighs ``decay**k`` (:func:`medusa_loss`).
      base: a model directory (checked against ``model_config``) or a params dict.

    Trainable: fresh heads (``drafter.init_heads``); their vocabulary projections are
    sharded like the LM head (embed, vocab), the rest replicated. ``apply`` returns the
    heads' logits float32 [B, T, K, V]; ``loss`` is :func:`medusa_loss`; the run writes the
    head directory (:func:`cadenza.decode.medusa.save_tree_heads`).
    """
    from cadenza.models import Transformer

    model = Transformer(model_config)
    abstract = drafter.abstract_heads(model_config)
    loaded = {}

    def load_frozen(mesh, rules):
        loaded["params"] = frozen_params(model_config, base, mesh, rules)
        return loaded["params"]

    def shardings(mesh, rules):
        logical = {k: {n: P("embed", "vocab") if k.endswith("_out") else P() for n in v}
                   for k, v in abstract.items()}
        return nn.logical_to_mesh_sharding(logical, mesh, rules)

    def init_trainable(rng, mesh, rules):
        del rng   # deterministic: zero blocks, copies of the LM head
        base_params = loaded.get("params") or load_frozen(mesh, rules)
        fresh = drafter.init_heads(model_config, base_params)
        # copies: the head projections start as the same LM-head buffer (the step donates)
        return donatable_copy(fresh, shardings(mesh, rules))

    def apply(trainable, frozen, batch, rng):
        del rng
        _, hidden, _ = model.apply({"params": frozen}, batch["inputs"],
                                   positions=batch["positions"],
                                   segment_ids=batch["segment_ids"])
        return drafter.teacher_forced_logits(trainable, jax.lax.stop_gradient(hidden),
                                             batch["targets"], frozen)

    def loss(trainable, frozen, batch, rng):
        total, count = medusa_loss(apply(trainable, frozen, batch, rng), batch, decay)
        return total, total, count

    n = param_count(abstract)
    return TrainTask(
        abstract_trainable=lambda: abstract, trainable_shardings=shardings,
        init_trainable=init_trainable, load_frozen=load_frozen,
        abstract_frozen=lambda mesh, rules: abstract_frozen_params(model_config, mesh, rules),
        apply=apply, loss=loss, export=lambda trainable, frozen: None,
        save_adapters=lambda d, trainable: save_tree_heads(d, drafter, model_config,
                                                           jax.device_get(trainable)),
        trainable_params=n, total_params=n + model_config.num_params())


def medusa_task(model_config, medusa, base) -> TrainTask:
    """Medusa heads on a frozen model: :func:`tree_heads_task` with the drafter
    :func:`medusa_drafter` gives for the ``train.medusa`` section ``medusa``
    (:class:`cadenza.train.config.MedusaTrainConfig`)."""
    return tree_heads_task(model_config, medusa_drafter(medusa), medusa.decay, base)


def train_tree_heads(model, params, batches, drafter, *, steps: int,
                     learning_rate: float = 1e-3, decay: float = 0.8, seed: int = 0):
    """Train ``drafter``'s fresh heads on ``batches`` (an iterator of int32 [B, T] token
    arrays) with :func:`tree_heads_task` through ``fit`` (one device, a temporary output
    directory). Returns ``(head params, list of per-step losses)``; ``params`` are not
    changed."""
    task = tree_heads_task(model.config, drafter, decay, params)
    return fit_on_tokens(model.config, task, batches,
                         lambda d: load_tree_heads(d, model.config, type(drafter))[1],
                         steps=steps, learning_rate=learning_rate, seed=seed)


def train_medusa_heads(model, params, batches, *, num_heads: int, steps: int,
                       learning_rate: float = 1e-3, blocks: int = 1, seed: int = 0):
    """:func:`train_tree_heads` for Medusa heads (the default tree cut to ``num_heads``).

    Returns ``(head params, list of per-step losses)``; ``params`` are not changed.
    """
    from cadenza.train.config import MedusaTrainConfig

    drafter = medusa_drafter(MedusaTrainConfig(num_heads=num_heads, blocks=blocks))
    return train_tree_heads(model, params, batches, drafter, steps=steps,
                            learning_rate=learning_rate, seed=seed)
