"""Decoding: one driver, a method interface, a registry of methods.

- :func:`generate` / :func:`stream`: decode a ragged prompt batch with the method
  ``DecodeConfig.method`` names (:mod:`cadenza.decode.registry`) -> :class:`GenerateResult`.
- :mod:`cadenza.decode.driver`: validation, bucketing, compile cache, chunking, results.
- :mod:`cadenza.decode.method`: the interface a method implements.
- :mod:`cadenza.decode.speculative`: the speculative round and its drafters' interface.
- :mod:`cadenza.decode.sampling`: pure jittable logit processing and token selection.
- :mod:`cadenza.decode.multi_lora`: many LoRA adapters in one batch, one per row.

Names are imported lazily so that reading configs does not import JAX.
"""

from cadenza.lazy_exports import lazy_getattr

_EXPORTS = {
    "DecodeConfig": "cadenza.decode.config",
    "SamplingConfig": "cadenza.decode.config",
    "SamplingSpec": "cadenza.decode.config",
    "GenerateResult": "cadenza.decode.driver",
    "StreamChunk": "cadenza.decode.driver",
    "ProxyTuning": "cadenza.decode.plain",
    "AdapterBank": "cadenza.decode.multi_lora",
    "load_adapter_bank": "cadenza.decode.multi_lora",
    "generate": "cadenza.decode.registry",
    "stream": "cadenza.decode.registry",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
