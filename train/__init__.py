"""The training core: mesh + sharding, the jitted train step, optimizers, checkpoints, metrics.

- :func:`fit`: train an :class:`~cadenza.config.ExperimentConfig` (``cadenza train``).
- :class:`TrainTask` / :func:`full_model_task`: the trainable/frozen split (PEFT plugs in here).
- :class:`SyntheticBatches`: a deterministic iterator following the data interface.

Names are imported lazily so that reading configs does not import JAX.
"""

from cadenza.lazy_exports import lazy_getattr

_EXPORTS = {
    "fit": "cadenza.train.trainer",
    "NonFiniteError": "cadenza.train.trainer",
    "TrainTask": "cadenza.train.task",
    "full_model_task": "cadenza.train.task",
    "SyntheticBatches": "cadenza.train.synthetic",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
