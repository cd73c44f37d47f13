"""What the trainer optimises: a :class:`TrainTask` (full fine-tuning, or PEFT plugged in).

The train step differentiates a *trainable* pytree only; everything else is
a *frozen* pytree passed through unchanged (never donated, no optimizer
state). A task supplies both trees, how to run the model on them, and how to
turn them back into plain model params for :func:`cadenza.models.save_model`.

Full fine-tuning (:func:`full_model_task`) makes every model param
trainable and the frozen tree empty. A PEFT method builds its own task:
trainable = adapter params, frozen = the base model params, ``apply`` runs
the model with the adapters intercepted, ``export`` merges the adapters.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from cadenza.models.config import ModelConfig

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TrainTask:
    """The trainable/frozen split of a model and how to apply it.

    Attributes:
      abstract_trainable: () -> pytree of ``jax.ShapeDtypeStruct`` (the trainable tree).
      trainable_shardings: (mesh, rules) -> pytree of ``NamedSharding`` matching it.
      init_trainable: (rng key, mesh, rules) -> the trainable tree, placed with those
        shardings (fresh run; a resumed run restores it from the checkpoint instead).
      load_frozen: (mesh, rules) -> the frozen tree, placed on ``mesh`` (``{}`` if none).
      abstract_frozen: (mesh, rules) -> the frozen tree as ``jax.ShapeDtypeStruct`` s with
        shardings, read from nothing (for AOT compiles).
      apply: (trainable, frozen, batch, rng) -> logits float32 [B, T, vocab]. ``batch``
        holds int32 [B, T] ``inputs``, ``positions`` and ``segment_ids``; ``rng`` is a
        per-microbatch key in training (for dropout, NEFTune) and None in evaluation
        (no noise). Called inside jit under the logical-axis rules.
      export: (trainable, frozen) -> plain model params (what ``save_model`` writes), or
        None when the trained state cannot be folded into model params (prefix/prompt
        tuning: only ``save_adapters`` output exists then).
      trainable_params / total_params: parameter counts (MFU counts weight-gradient
        work only for the trainable ones).
      wrap_optimizer: tx -> tx for the trainable tree (LoRA+ scales B's updates).
      save_adapters: (directory, trainable) -> None, or None; PEFT writes its adapters
        (``<output_dir>/adapters``) at the end of a run (head tasks: their head directory).
      loss: (trainable, frozen, batch, rng) -> ``(objective_sum, loss_sum, count)`` float32
        scalars (sums over the microbatch and the count they are averaged over), or None
        for the masked next-token cross-entropy of ``apply``'s logits. Tasks that train
        something other than next-token logits set it (Medusa and SpecDec++ heads, the
        preference objectives); the trainer's z-loss is not added to it. It may return a
        fourth element, a dict of extra float32 metric sums averaged over the same count
        and reported by name (train and eval).
      apply_with_aux: (trainable, frozen, batch, rng) -> ``(logits, aux)``, or None; when
        set the step uses it instead of ``apply``: ``aux`` maps metric names to
        ``(value, weight)`` float32 scalars (per-token means), each added to the objective
        as ``weight * value`` and reported as a metric (mixture-of-experts router losses).
    """

    abstract_trainable: Callable[[], PyTree]
    trainable_shardings: Callable[[Mesh, Any], PyTree]
    init_trainable: Callable[[jax.Array, Mesh, Any], PyTree]
    load_frozen: Callable[[Mesh, Any], PyTree]
    apply: Callable[[PyTree, PyTree, dict, jax.Array], jax.Array]
    export: Callable[[PyTree, PyTree], PyTree]
    trainable_params: int
    total_params: int
    abstract_frozen: Callable[[Mesh, Any], PyTree] = lambda mesh, rules: {}
    wrap_optimizer: Callable[[Any], Any] = lambda tx: tx
    save_adapters: Callable[[Any, PyTree], None] | None = None
    loss: Callable[[PyTree, PyTree, dict, Any], tuple] | None = None
    apply_with_aux: Callable[[PyTree, PyTree, dict, Any], tuple] | None = None


def full_model_task(model_config: ModelConfig, neftune_alpha: float = 0.0,
                    init_from: str | None = None,
                    init_field: str = "train.init_from") -> TrainTask:
    """Every model param trainable (plain pretraining / full fine-tuning).

    ``neftune_alpha > 0`` adds NEFTune noise to the input embeddings in training
    steps only (see :func:`cadenza.train.data.neftune.neftune_noise`).
    ``init_from``: a model directory to start from instead of random init (``init_field``:
    the config field that names it, for errors).
    """
    from cadenza.models import Transformer, abstract_params, init_params, param_shardings

    model = Transformer(model_config)

    def apply(trainable, frozen, batch, rng):
        del frozen
        return noisy_apply(model, {"params": trainable}, batch, rng, neftune_alpha)

    def apply_with_aux(trainable, frozen, batch, rng):
        del frozen
        logits, state = noisy_apply(model, {"params": trainable}, batch, rng, neftune_alpha,
                                    mutable=["intermediates"])
        return logits, router_aux(model_config, state["intermediates"])

    n = model_config.num_params()
    return TrainTask(
        abstract_trainable=lambda: abstract_params(model_config),
        trainable_shardings=lambda mesh, rules: param_shardings(model_config, mesh, rules),
        init_trainable=lambda rng, mesh, rules: (
            init_params(model_config, rng, mesh, rules) if init_from is None
            else load_base_params(model_config, init_from, mesh, rules, field=init_field)),
        load_frozen=lambda mesh, rules: {},
        apply=apply,
        export=lambda trainable, frozen: trainable,
        trainable_params=n, total_params=n,
        apply_with_aux=apply_with_aux if model_config.is_moe else None)



def router_aux(model_config: ModelConfig, intermediates) -> dict:
    """A TrainTask ``apply_with_aux`` metric dict: the MoE router losses of the router
    logits the model sowed in ``intermediates``, with their objective weights."""
    from cadenza.models.moe import collected_router_losses

    losses = collected_router_losses(intermediates, model_config.num_experts_per_tok)
    return {"router_load_balancing": (losses["load_balancing"], model_config.router_aux_loss_coef),
            "router_z_loss": (losses["z_loss"], model_config.router_z_loss_coef)}


def noisy_apply(model, variables, batch, rng, neftune_alpha: float, **apply_kwargs):
    """``model.apply`` on a training batch; with ``rng`` (training) and ``neftune_alpha > 0``
    the input embeddings get NEFTune noise. Returns logits float32 [B, T, vocab], or
    ``(logits, collections)`` when ``apply_kwargs`` has ``mutable``."""
    from cadenza.models import Transformer
    from cadenza.train.data.neftune import neftune_noise

    kwargs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"], **apply_kwargs)
    if rng is None or not neftune_alpha:
        out = model.apply(variables, batch["inputs"], **kwargs)
    else:
        embeddings = model.apply(variables, batch["inputs"], method=Transformer.embed_tokens)
        embeddings = neftune_noise(embeddings, batch["segment_ids"], rng, neftune_alpha)
        out = model.apply(variables, embeddings=embeddings, **kwargs)
    if "mutable" in apply_kwargs:
        (logits, *_), collections = out
        return logits, collections
    return out[0]


def donatable_copy(tree, shardings):
    """``tree`` placed with ``shardings`` in buffers of its own, so the train step may donate
    them while the caller keeps using ``tree``.

    (jax 0.12's ``device_put(..., may_alias=False)`` onto a replicated multi-device
    sharding still reuses the source buffer for one device's shard: copy first.)"""
    import jax.numpy as jnp

    return jax.device_put(jax.tree.map(lambda x: jnp.array(x, copy=True), tree), shardings)


def load_base_params(model_config: ModelConfig, directory, mesh, rules,
                     field: str = "train.init_from"):
    """Params of the model directory ``directory``, placed on ``mesh``; fails clearly
    (naming the config ``field`` that gave the directory) unless it was saved for the same
    model shape as ``model_config``."""
    from cadenza.errors import CadenzaError
    from cadenza.models import load_model
    from cadenza.train.checkpoints import model_differences

    saved, params = load_model(directory, mesh=mesh, rules=rules)
    diffs = model_differences(saved.model, model_config, names=(str(directory), "this run"))
    if diffs:
        raise CadenzaError(f"{field} holds a different model: " + "; ".join(diffs),
                           where=str(directory),
                           fix="set the model section to the saved model's (e.g. "
                               "model.preset and the same overrides) or pick another directory")
    return params
