"""Growing a model's vocabulary by new rows (e.g. a placeholder id for LUD)."""

import dataclasses

import jax.numpy as jnp

from cadenza.errors import CadenzaError


def extend_vocab(config, params: dict, extra: int):
    """A model with ``extra`` new vocabulary rows after the existing ones.

    Args:
      config: the ExperimentConfig of the model (``model.vocab_size`` = V).
      params: its params (plain dict): ``embed/embedding`` [V, D] and, unless embeddings
        are tied, ``lm_head/kernel`` [D, V].
      extra: rows to add (>= 1); the new ids are V .. V + extra - 1.

    Each new input-embedding row is the mean of the existing rows and each new output
    column the mean of the existing columns, so a new id starts as an "average" token:
    never the argmax of a trained model, and a neutral input. Returns ``(config, params)``
    with ``model.vocab_size = V + extra`` (new dicts; other leaves are shared). The
    tokenizer is unchanged: it never produces the new ids.
    """
    if extra < 1:
        raise CadenzaError(f"cannot add {extra} vocabulary rows", where="extend_vocab(extra=)",
                           fix="pass a positive number of rows")
    vocab = config.model.vocab_size
    table = params["embed"]["embedding"]
    if table.shape[0] != vocab:
        raise CadenzaError(f"embedding table has {table.shape[0]} rows but model.vocab_size is "
                           f"{vocab}", where="params embed/embedding",
                           fix="pass the params that belong to this config")

    def grow(x, axis):
        mean = jnp.mean(x.astype(jnp.float32), axis=axis, keepdims=True).astype(x.dtype)
        reps = [1] * x.ndim
        reps[axis] = extra
        return jnp.concatenate([x, jnp.tile(mean, reps)], axis=axis)

    new = {**params, "embed": {**params["embed"], "embedding": grow(table, 0)}}
    if "lm_head" in params:
        new["lm_head"] = {**params["lm_head"], "kernel": grow(params["lm_head"]["kernel"], 1)}
    model = dataclasses.replace(config.model, vocab_size=vocab + extra)
    return dataclasses.replace(config, model=model), new
