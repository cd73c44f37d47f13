"""Decoding: the jitted prefill + ``lax.while_loop`` generate loop and its samplers.

- :func:`generate`: ragged prompt batch -> :class:`GenerateResult` (ids, text, logprobs, stats).
- :func:`stream`: the same, yielding :class:`StreamChunk` every N decode steps.
- :class:`ProxyTuning`: proxy-tuning / EFT partners decoded in lockstep.
- :mod:`cadenza.decode.sampling`: pure jittable logit processing and token selection.

Names are imported lazily so that reading configs does not import JAX.
"""

from cadenza.lazy_exports import lazy_getattr

_EXPORTS = {
    "DecodeConfig": "cadenza.decode.config",
    "SamplingSpec": "cadenza.decode.config",
    "GenerateResult": "cadenza.decode.loop",
    "ProxyTuning": "cadenza.decode.loop",
    "StreamChunk": "cadenza.decode.loop",
    "generate": "cadenza.decode.loop",
    "stream": "cadenza.decode.loop",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
