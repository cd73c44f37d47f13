"""The LUD fine-tuning task: full fine-tuning on placeholder rows under the LUD mask.

Batches come from :mod:`cadenza.train.lud_data` and carry ``lud_group`` [B, T] besides
the usual arrays; ``apply`` turns it into the [B, T, T] attention mask
(:func:`~cadenza.train.lud_data.lud_attention_mask`) and runs the model with the
rows' explicit positions. The loss is the trainer's masked CE: next-token CE at real
tokens plus CE at placeholders (weights in ``loss_mask``).

[choice, METHODS.md 7.2] The placeholder id is a dedicated vocabulary row whose input
embedding starts at the mean of all other rows (:func:`with_placeholder_embedding`).
cadenza does not grow the vocabulary: the id is ``lud.placeholder_id`` (default the last
row, which the byte corpus never uses); a tokenizer with no spare id needs its
vocabulary padded when the model is built.

Typical use (``cadenza train`` wiring is left to the train CLI)::

    rows, stats = prepare_lud_rows(cfg.model, base_params, tokens, cfg.lud,
                                   seq_len=cfg.train.seq_len)
    fit(cfg, data=RowIterator(rows, cfg.train.batch_size),
        task=lud_task(cfg.model, base_params, cfg.lud))
"""

import jax
import jax.numpy as jnp

from cadenza.errors import ConfigError
from cadenza.train.lud_data import lud_attention_mask
from cadenza.train.task import TrainTask


def with_placeholder_embedding(params: dict, placeholder_id: int) -> dict:
    """``params`` with the input embedding row ``placeholder_id`` set to the mean of the
    other rows (a new dict; the other leaves are shared)."""
    table = params["embed"]["embedding"]
    others = jnp.concatenate([table[:placeholder_id], table[placeholder_id + 1:]])
    row = others.astype(jnp.float32).mean(axis=0).astype(table.dtype)
    return {**params, "embed": {**params["embed"],
                                "embedding": table.at[placeholder_id].set(row)}}


def check_placeholder_id(model_config, placeholder_id: int) -> None:
    """Fail unless ``placeholder_id`` is a vocabulary row other than pad/BOS/EOS."""
    special = {model_config.pad_token_id, model_config.bos_token_id, model_config.eos_token_id}
    if not 0 <= placeholder_id < model_config.vocab_size or placeholder_id in special:
        raise ConfigError(f"placeholder id {placeholder_id} is outside the vocabulary "
                          f"(0..{model_config.vocab_size - 1}) or a pad/BOS/EOS id",
                          where="lud.placeholder_id",
                          fix="use -1 (the last row) or another id the tokenizer never emits")


def lud_task(model_config, base_params: dict, lud) -> TrainTask:
    """Every param trainable, initialised from ``base_params`` with the placeholder row reset.

    Args:
      model_config: the ModelConfig.
      base_params: the model to fine-tune (plain params dict, any placement).
      lud: the :class:`~cadenza.decode.lud_config.LudConfig` (for the placeholder id).

    ``init_trainable`` ignores its rng and places a copy of the params with the model's
    shardings (``base_params`` is never donated).
    """
    from cadenza.models import Transformer, abstract_params, param_shardings

    model = Transformer(model_config)
    placeholder_id = lud.resolved_placeholder_id(model_config.vocab_size)
    check_placeholder_id(model_config, placeholder_id)

    def apply(trainable, frozen, batch, rng):
        del frozen, rng
        logits, _, _ = model.apply({"params": trainable}, batch["inputs"],
                                   positions=batch["positions"], segment_ids=batch["segment_ids"],
                                   attention_mask=lud_attention_mask(batch["lud_group"]))
        return logits

    def init_trainable(rng, mesh, rules):
        del rng
        params = with_placeholder_embedding(base_params, placeholder_id)
        # a copy: the train step donates its state, ``base_params`` must stay usable
        return jax.device_put(params, param_shardings(model_config, mesh, rules),
                              may_alias=False)

    n = model_config.num_params()
    return TrainTask(
        abstract_trainable=lambda: abstract_params(model_config),
        trainable_shardings=lambda mesh, rules: param_shardings(model_config, mesh, rules),
        init_trainable=init_trainable,
        load_frozen=lambda mesh, rules: {},
        apply=apply,
        export=lambda trainable, frozen: trainable,
        trainable_params=n, total_params=n)


def finetune_lud(config, base_params: dict, tokens, *, devices=None):
    """Mark units with ``base_params`` on ``tokens``, build the rows and fine-tune with ``fit``.

    Args:
      config: the ExperimentConfig (``model``, ``train``, ``mesh`` and ``lud`` sections).
      base_params: the model that marks the units and that is fine-tuned.
      tokens: int [S] training token stream.
      devices: passed to :func:`cadenza.train.fit`.

    Returns ``(summary, params, stats)``: fit's summary, the fine-tuned params (read back
    from the exported model directory) and the row statistics (a dict).
    """
    from cadenza.models import load_model
    from cadenza.train.lud_data import RowIterator, prepare_lud_rows
    from cadenza.train.trainer import fit

    pad = config.model.pad_token_id or 0
    rows, stats = prepare_lud_rows(config.model, base_params, tokens, config.lud,
                                   seq_len=config.train.seq_len, pad_id=pad)
    data = RowIterator(rows, config.train.batch_size // jax.process_count(),
                       seed=config.train.seed)
    summary = fit(config, data=data, task=lud_task(config.model, base_params, config.lud),
                  devices=devices)
    _, params = load_model(summary["model_dir"])
    return summary, params, stats.as_dict()
