"""Plumbing shared by the head tasks (Medusa and Hydra heads, the SpecDec++ acceptance head).

Both train a small head on the hidden states of a frozen model with ``fit``: the
frozen model comes from a model directory (``train.init_from``, checked against
the model section) or from params in memory; the head is the trainable tree; the
task's ``save_adapters`` writes the head directory (``<output_dir>/adapters``) at
the end of the run and ``export`` returns None (no model is written).

- :func:`head_task`: the task ``train.task`` names (what ``fit`` uses by default).
- :func:`frozen_params` / :func:`abstract_frozen_params`: a frozen model placed on a mesh.
- :func:`fit_on_tokens`: ``fit`` on an in-memory iterator of token arrays (Python API
  and benchmarks: :func:`~cadenza.train.medusa_task.train_medusa_heads`,
  :func:`~cadenza.train.specdec_task.train_accept_head`).
"""

import itertools
import json
import pathlib
import tempfile

import jax
import numpy as np

from cadenza.errors import ConfigError


def head_task(config):
    """The :class:`~cadenza.train.task.TrainTask` of ``config.train.task`` (medusa | hydra |
    specdec)."""
    if config.peft.method != "none":
        raise ConfigError(f"train.task={config.train.task} trains heads on a frozen model and "
                          f"does not combine with peft.method={config.peft.method}",
                          where="peft.method", fix="set peft.method=none, or train.task=lm")
    if config.train.task == "medusa":
        from cadenza.train.medusa_task import medusa_task

        return medusa_task(config.model, config.train.medusa, config.train.init_from)
    if config.train.task == "hydra":
        from cadenza.train.hydra_task import hydra_task

        return hydra_task(config.model, config.train.medusa, config.train.init_from)
    from cadenza.train.specdec_task import specdec_task

    return specdec_task(config.model, config.train.specdec, config.train.init_from)


def frozen_params(model_config, base, mesh, rules):
    """``base`` (a model directory, checked against ``model_config``, or a params dict) placed
    on ``mesh`` with the model's shardings."""
    from cadenza.models import param_shardings
    from cadenza.train.task import load_base_params

    if isinstance(base, (str, pathlib.Path)):
        return load_base_params(model_config, str(base), mesh, rules)
    return jax.device_put(base, param_shardings(model_config, mesh, rules))


def abstract_frozen_params(model_config, mesh, rules):
    """The frozen model's params as ``jax.ShapeDtypeStruct`` s with shardings (AOT compiles)."""
    from cadenza.models import abstract_params, param_shardings

    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_params(model_config), param_shardings(model_config, mesh, rules))


def param_count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class TokenBatches:
    """Training batches from an iterator of int32 [B, T + 1] token arrays: row i becomes
    ``inputs`` = tokens[:, :-1], ``targets`` = tokens[:, 1:], one segment, all counted."""

    def __init__(self, batches):
        self.batches, self.index = batches, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        tokens = np.asarray(next(self.batches), np.int32)
        self.index += 1
        shape = (tokens.shape[0], tokens.shape[1] - 1)
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                "loss_mask": np.ones(shape, np.float32), "segment_ids": np.ones(shape, np.int32),
                "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        if int(state["index"]) != self.index:
            raise ValueError("a TokenBatches iterator cannot seek")


def fit_on_tokens(model_config, task, batches, read_head, *, steps: int, learning_rate: float,
                  seed: int = 0):
    """Train ``task`` with ``fit`` for ``steps`` updates on ``batches`` (an iterator of int32
    [B, T + 1] token arrays, see :class:`TokenBatches`) on one device, in a temporary
    output directory; AdamW, 3% linear warm-up, cosine decay to 0, no weight decay.

    ``read_head(directory)`` reads the head directory the task wrote. Returns ``(its
    result, per-step training losses)``.
    """
    from cadenza.config import ExperimentConfig
    from cadenza.train.config import TrainConfig
    from cadenza.train.trainer import fit

    first = np.asarray(next(batches))
    data = TokenBatches(itertools.chain([first], batches))
    with tempfile.TemporaryDirectory() as tmp:
        train = TrainConfig(output_dir=tmp, seed=seed, steps=steps, batch_size=first.shape[0],
                            seq_len=first.shape[1] - 1, learning_rate=learning_rate,
                            warmup_steps=max(1, int(0.03 * steps)), min_lr_ratio=0.0,
                            log_every=1, async_checkpoints=False, tensorboard=False,
                            progress_bar=False)
        summary = fit(ExperimentConfig(model=model_config, train=train), data=data, task=task,
                      devices=jax.devices()[:1])
        lines = (pathlib.Path(tmp) / "metrics.jsonl").read_text().splitlines()
        losses = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
        return read_head(summary["adapters_dir"]), losses
