"""Training the SpecDec++ acceptance head (:class:`cadenza.decode.specdec_head.AcceptHead`).

Data [SpecDec++, code]: for each position t of a token sequence x, a draft
token d ~ q(. | x_<t) is drawn given the true prefix and labelled with the
soft acceptance probability ``y = min(1, p(d | x_<t) / q(d | x_<t))`` (p =
target, q = draft, both raw). The head's input is the frozen draft's final
hidden state where d is *fed*: the sequence with tokens swapped for their
draft tokens, except a random 15% kept (no loss there).

Loss: ``-sum[w (1 - y) log P_reject + y log P_accept] / sum[w (1 - y) + y]``
with w = 6. Only the head trains; target and draft stay frozen.

``cadenza train`` with ``train.task: specdec`` (section ``train.specdec``:
the draft directory, blocks, w; target ``train.init_from``) runs
:func:`specdec_task` through ``fit`` and writes the head directory
(:func:`cadenza.decode.specdec_head.save_accept_head`) to ``<output_dir>/adapters``;
:func:`train_accept_head` does the same from Python on in-memory token arrays.
"""

import jax
import jax.numpy as jnp

from cadenza.decode.specdec_head import (
    AcceptHead,
    init_accept_head,
    load_accept_head,
    save_accept_head,
)
from cadenza.train.head_fit import (
    abstract_frozen_params,
    fit_on_tokens,
    frozen_params,
    param_count,
)
from cadenza.train.task import TrainTask

KEEP_FRACTION = 0.15
REJECT_WEIGHT = 6.0


def specdec_examples(target, target_params, draft, draft_params, tokens, key, *,
                     positions=None, segment_ids=None, loss_mask=None,
                     keep_fraction: float = KEEP_FRACTION):
    """tokens int32 [B, T] -> (inputs int32 [B, T], labels float32 [B, T], mask float32 [B, T]).

    ``inputs[:, t]`` (t >= 1) is the draft token for position t (or the true
    token, kept with probability ``keep_fraction``); ``labels`` its soft acceptance
    probability; ``mask`` is 1 where a draft token was swapped in. Packed rows:
    with ``positions`` / ``segment_ids`` (and ``loss_mask``, 1 where ``tokens[:, t + 1]``
    is a counted next token), position t only counts when it continues t - 1's segment
    and that next token counts.
    """
    kw = dict(positions=positions, segment_ids=segment_ids)
    p = jax.nn.log_softmax(target.apply({"params": target_params}, tokens, **kw)[0][:, :-1])
    q = jax.nn.log_softmax(draft.apply({"params": draft_params}, tokens, **kw)[0][:, :-1])
    k_draw, k_keep = jax.random.split(key)
    d = jax.random.categorical(k_draw, q).astype(jnp.int32)
    p_d = jnp.take_along_axis(p, d[..., None], -1)[..., 0]
    q_d = jnp.take_along_axis(q, d[..., None], -1)[..., 0]
    y = jnp.minimum(1.0, jnp.exp(p_d - q_d))
    keep = jax.random.bernoulli(k_keep, keep_fraction, d.shape)
    swap = ~keep
    if segment_ids is not None:
        swap = swap & (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    if loss_mask is not None:
        swap = swap & (loss_mask[:, :-1] > 0)
    inputs = tokens.at[:, 1:].set(jnp.where(swap, d, tokens[:, 1:]))
    pad = jnp.zeros_like(tokens[:, :1], jnp.float32)
    labels = jnp.concatenate([pad, y], axis=1)
    mask = jnp.concatenate([pad, swap.astype(jnp.float32)], axis=1)
    return inputs, labels, mask


def head_loss_sums(head_params, hidden, labels, mask, blocks: int = 3,
                   reject_weight: float = REJECT_WEIGHT):
    """SpecDec++ weighted BCE sums of the head on hidden [B, T, D] against soft labels
    [B, T]: returns ``(loss_sum, weight_sum)``; the loss is their ratio."""
    logp = AcceptHead(blocks).apply({"params": head_params}, hidden)
    w = reject_weight * (1.0 - labels) * mask
    a = labels * mask
    return -jnp.sum(w * logp[..., 0] + a * logp[..., 1]), jnp.sum(w + a)


def specdec_task(model_config, specdec, base, draft_base=None) -> TrainTask:
    """The SpecDec++ head of a frozen draft against a frozen target.

    Args:
      model_config: the target's ModelConfig; ``base``: the target (model directory,
        checked against ``model_config``, or params dict).
      specdec: the ``train.specdec`` section (:class:`cadenza.train.config.SpecDecTrainConfig`).
      draft_base: ``(draft ModelConfig, draft params)``; None loads ``specdec.draft``.

    Frozen: ``{"target": ..., "draft": ...}``. Trainable: a fresh head (replicated).
    ``apply`` returns the head's log-probs [B, T, 2] on the draft's hidden states of the
    swapped inputs; ``loss`` the weighted BCE sums (the draft tokens are drawn with the
    step's rng, a fixed key in evaluation).
    """
    from cadenza.models import Transformer, load_model

    if draft_base is None:
        draft_config = load_model(specdec.draft)[0].model
    else:
        draft_config = draft_base[0]
    target, draft = Transformer(model_config), Transformer(draft_config)
    head = AcceptHead(specdec.blocks)
    abstract = jax.eval_shape(
        lambda: init_accept_head(draft_config.hidden_size, jax.random.key(0), specdec.blocks))

    def load_frozen(mesh, rules):
        dparams = draft_base[1] if draft_base is not None else specdec.draft
        return {"target": frozen_params(model_config, base, mesh, rules),
                "draft": frozen_params(draft_config, dparams, mesh, rules)}

    def shardings(mesh, rules):
        from cadenza.train.mesh import replicated

        return jax.tree.map(lambda _: replicated(mesh), abstract)

    def init_trainable(rng, mesh, rules):
        fresh = init_accept_head(draft_config.hidden_size, rng, specdec.blocks)
        return jax.device_put(fresh, shardings(mesh, rules))

    def examples(frozen, batch, rng):
        key = jax.random.key(0) if rng is None else rng
        inputs, labels, mask = specdec_examples(
            target, frozen["target"], draft, frozen["draft"], batch["inputs"], key,
            positions=batch["positions"], segment_ids=batch["segment_ids"],
            loss_mask=batch["loss_mask"], keep_fraction=specdec.keep_fraction)
        _, hidden, _ = draft.apply({"params": frozen["draft"]}, inputs,
                                   positions=batch["positions"], segment_ids=batch["segment_ids"])
        return jax.lax.stop_gradient(hidden), labels, mask

    def apply(trainable, frozen, batch, rng):
        hidden, _, _ = examples(frozen, batch, rng)
        return head.apply({"params": trainable}, hidden)

    def loss(trainable, frozen, batch, rng):
        hidden, labels, mask = examples(frozen, batch, rng)
        total, weight = head_loss_sums(trainable, hidden, labels, mask, specdec.blocks,
                                       specdec.reject_weight)
        return total, total, weight

    def abstract_frozen(mesh, rules):
        return {"target": abstract_frozen_params(model_config, mesh, rules),
                "draft": abstract_frozen_params(draft_config, mesh, rules)}

    n = param_count(abstract)
    return TrainTask(
        abstract_trainable=lambda: abstract, trainable_shardings=shardings,
        init_trainable=init_trainable, load_frozen=load_frozen, abstract_frozen=abstract_frozen,
        apply=apply, loss=loss, export=lambda trainable, frozen: None,
        save_adapters=lambda d, trainable: save_accept_head(
            d, jax.device_get(trainable), draft_config.hidden_size, specdec.blocks),
        trainable_params=n,
        total_params=n + model_config.num_params() + draft_config.num_params())


def train_accept_head(target, target_params, draft, draft_params, batches, *, steps: int,
                      learning_rate: float = 1e-3, seed: int = 0, blocks: int = 3):
    """Train a fresh head for ``steps`` updates on ``batches`` (an iterator of int32 [B, T])
    with :func:`specdec_task` through ``fit`` (one device, a temporary output directory).

    Target and draft stay frozen. Returns ``(head params, list of per-step losses)``.
    """
    from cadenza.train.config import SpecDecTrainConfig

    task = specdec_task(target.config, SpecDecTrainConfig(blocks=blocks), target_params,
                        (draft.config, draft_params))
    return fit_on_tokens(target.config, task, batches,
                         lambda d: load_accept_head(d, draft.config)[0], steps=steps,
                         learning_rate=learning_rate, seed=seed)
