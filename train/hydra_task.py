"""Training Hydra heads: the base model frozen, heads that read the drafted tokens learn.

Hydra heads (:mod:`cadenza.decode.hydra`) train like Medusa heads
(:func:`cadenza.train.medusa_task.tree_heads_task`, the same weighted head
cross-entropy :func:`~cadenza.train.medusa_task.medusa_loss`) with teacher forcing:
head k at position t reads the hidden state there and the embeddings of the true
tokens ``targets[t .. t + k]`` (the pending token and the k before its guess) and
predicts ``targets[t + 1 + k]``.

``cadenza train`` with ``train.task: hydra`` (base ``train.init_from``; the heads'
count, blocks, loss decay and tree come from the ``train.medusa`` section) writes
the head directory (kind ``hydra``) to ``<output_dir>/adapters``, usable as
``cadenza generate --method hydra --heads DIR``; :func:`train_hydra_heads` does the
same from Python on in-memory token arrays.
"""

from cadenza.decode.hydra import Hydra
from cadenza.train.medusa_task import medusa_drafter, train_tree_heads, tree_heads_task
from cadenza.train.task import TrainTask


def hydra_drafter(section) -> Hydra:
    """The :class:`Hydra` drafter a ``train.medusa`` section describes (its tree, or the
    default tree cut to ``num_heads``)."""
    m = medusa_drafter(section)
    return Hydra(paths=m.paths, blocks=m.blocks, heads=m.heads)


def hydra_task(model_config, section, base) -> TrainTask:
    """Hydra heads on a frozen model ``base`` (a model directory or a params dict):
    :func:`~cadenza.train.medusa_task.tree_heads_task` with :func:`hydra_drafter`."""
    return tree_heads_task(model_config, hydra_drafter(section), section.decay, base)


def train_hydra_heads(model, params, batches, *, num_heads: int, steps: int,
                      learning_rate: float = 1e-3, blocks: int = 1, seed: int = 0):
    """Fresh Hydra heads (the default tree cut to ``num_heads``) trained on ``batches`` (an
    iterator of int32 [B, T] token arrays) through ``fit``; returns ``(head params,
    per-step losses)``. ``params`` are not changed."""
    from cadenza.train.config import MedusaTrainConfig

    drafter = hydra_drafter(MedusaTrainConfig(num_heads=num_heads, blocks=blocks))
    return train_tree_heads(model, params, batches, drafter, steps=steps,
                            learning_rate=learning_rate, seed=seed)
