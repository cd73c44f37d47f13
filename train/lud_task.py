"""The LUD fine-tuning task: full fine-tuning on placeholder rows under the LUD mask.

Batches come from :mod:`cadenza.train.lud_data` and carry ``lud_group`` [B, T] besides
the usual arrays; ``apply`` turns it into the [B, T, T] attention mask
(:func:`~cadenza.train.lud_data.lud_attention_mask`) and runs the model with the
rows' explicit positions. The loss is the trainer's masked CE: next-token CE at real
tokens plus CE at placeholders (weights in ``loss_mask``).

[choice] The placeholder id is a dedicated vocabulary row whose input embedding starts
at the mean of all other rows (:func:`with_placeholder_embedding`): ``lud.placeholder_id``
(default the last row, which the byte corpus never uses). A tokenizer with no spare id
gets one with :func:`cadenza.models.vocab.extend_vocab` (one row added to the embedding
and the LM head, saved with the model), as the quickstart does.

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
from cadenza.train.task import TrainTask, donatable_copy


def with_placeholder_embedding(params: dict, placeholder_id: int) -> dict:
    """``params`` with the input embedding row ``placeholder_id`` set to the mean of the
    other rows (a new dict; the other leaves are shared)."""
    table = params["embed"]["embedding"]
    others = jnp.concatenate([table[:placeholder_id], table[placeholder_id + 1:]])
    row = others.astype(jnp.float32).mean(axis=0).astype(table.dtype)
    return {**params, "embed": {**params["embed"],
                                "embedding": table.at[placeholder_id].set(row)}}


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
    placeholder_id = lud.placeholder_for(model_config)

    def apply(trainable, frozen, batch, rng):
        del frozen, rng
        logits, _, _ = model.apply({"params": trainable}, batch["inputs"],
                                   positions=batch["positions"], segment_ids=batch["segment_ids"],
                                   attention_mask=lud_attention_mask(batch["lud_group"]))
        return logits

    def init_trainable(rng, mesh, rules):
        del rng
        # a copy: the train step donates its state, ``base_params`` must stay usable
        return donatable_copy(with_placeholder_embedding(base_params, placeholder_id),
                              param_shardings(model_config, mesh, rules))

    n = model_config.num_params()
    return TrainTask(
        abstract_trainable=lambda: abstract_params(model_config),
        trainable_shardings=lambda mesh, rules: param_shardings(model_config, mesh, rules),
        init_trainable=init_trainable,
        load_frozen=lambda mesh, rules: {},
        apply=apply,
        export=lambda trainable, frozen: trainable,
        trainable_params=n, total_params=n)


def finetune_lud(config, base_params: dict | None = None, tokens=None, *, devices=None):
    """Mark units with ``base_params`` on ``tokens``, build the rows and fine-tune with ``fit``.

    Args:
      config: the ExperimentConfig (``model``, ``train``, ``mesh`` and ``lud`` sections).
      base_params: the model that marks the units and that is fine-tuned; None loads the
        model directory ``lud.base_model``.
      tokens: int [S] training token stream; None = the byte-level stdlib corpus
        (:func:`~cadenza.train.lud_data.stdlib_byte_tokens`, for byte-level models such as
        the tiny preset) [choice: until the LUD rows are built from the data pipeline].
      devices: passed to :func:`cadenza.train.fit`.

    This is what ``cadenza train`` should call for a config with ``lud.base_model`` set.

    Returns ``(summary, params, stats)``: fit's summary, the fine-tuned params (read back
    from the exported model directory) and the row statistics (a dict).
    """
    from cadenza.models import load_model
    from cadenza.train.lud_data import RowIterator, prepare_lud_rows, stdlib_byte_tokens
    from cadenza.train.trainer import fit

    if base_params is None:
        if not config.lud.base_model:
            raise ConfigError("LUD fine-tuning needs a base model", where="lud.base_model",
                              fix="set lud.base_model to a model directory (or pass params)")
        _, base_params = load_model(config.lud.base_model)
    if tokens is None:
        tokens = stdlib_byte_tokens()
    pad = config.model.pad_token_id or 0
    rows, stats = prepare_lud_rows(config.model, base_params, tokens, config.lud,
                                   seq_len=config.train.seq_len, pad_id=pad)
    data = RowIterator(rows, config.train.batch_size // jax.process_count(),
                       seed=config.train.seed)
    summary = fit(config, data=data, task=lud_task(config.model, base_params, config.lud),
                  devices=devices)
    _, params = load_model(summary["model_dir"])
    return summary, params, stats.as_dict()
