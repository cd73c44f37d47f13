"""A deterministic synthetic batch iterator (tests, benchmarks, smoke runs).

Follows the data interface of ``cadenza.train.data``: yields dicts of numpy
[rows, seq_len] arrays (``inputs``, ``targets``, ``loss_mask``,
``segment_ids``, ``positions``) and has JSON ``get_state`` / ``set_state``.
Each row repeats a random pattern of ``period`` tokens, so a model can learn
it and the loss falls; batch ``i`` depends only on ``(seed, i)``.
"""

import numpy as np


class SyntheticBatches:
    """Batches of ``rows`` x ``seq_len`` tokens below ``vocab_size`` (ids 0-2 unused)."""

    def __init__(self, rows: int, seq_len: int, vocab_size: int, *, seed: int = 0,
                 period: int = 8):
        self.rows, self.seq_len, self.vocab_size = rows, seq_len, vocab_size
        self.seed, self.period = seed, period
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, self.index])
        self.index += 1
        pattern = rng.integers(3, self.vocab_size, size=(self.rows, self.period))
        reps = -(-(self.seq_len + 1) // self.period)
        tokens = np.tile(pattern, (1, reps))[:, :self.seq_len + 1].astype(np.int32)
        shape = (self.rows, self.seq_len)
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                "loss_mask": np.ones(shape, np.float32),
                "segment_ids": np.ones(shape, np.int32),
                "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32),
                                             shape).copy()}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])
