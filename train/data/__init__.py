"""Instruction-tuning and pretraining data: TFDS builders, formatting, packing, grain loading.

- :func:`build_iterator`: the training helper's entry point (host-local batches,
  ``get_state``/``set_state``).
- :func:`build` / :func:`open_split`: prepare / open TFDS datasets.
- :class:`Formatter`: records -> tokens + assistant-only loss masks.
- :func:`neftune_noise`: NEFTune noise on input embeddings (training only).

Names are imported lazily (grain and TFDS load on first use).
"""

from cadenza.lazy_exports import lazy_getattr

_EXPORTS = {
    "build_iterator": "cadenza.train.data.pipeline",
    "resolve_tokenizer": "cadenza.train.data.pipeline",
    "DataIterator": "cadenza.train.data.pipeline",
    "build": "cadenza.train.data.builders",
    "open_split": "cadenza.train.data.builders",
    "Formatter": "cadenza.train.data.formatting",
    "neftune_noise": "cadenza.train.data.neftune",
    "Problems": "cadenza.train.data.records",
    "read_records": "cadenza.train.data.records",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
