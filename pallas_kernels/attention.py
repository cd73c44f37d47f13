"""The one attention entry point the model calls; picks a kernel per backend and case.

``implementation`` (``model.attention_impl``):

- ``"xla"``: plain XLA, always (:mod:`~cadenza.pallas_kernels.attention_xla` without a
  cache or soft-cap, else the reference).
- ``"pallas"``: the Pallas kernels. TPU: splash flash attention for training
  and prefill (no cache), the ragged verify/decode kernel with a cache; on a
  CPU backend these run in Pallas interpret mode (tests, slow). GPU: the
  Mosaic GPU (Hopper) kernels, flash attention fwd+bwd
  (:mod:`~cadenza.pallas_kernels.flash_attention_mosaic_gpu`) and the ragged
  verify/decode kernel (:mod:`~cadenza.pallas_kernels.decode_attention_gpu`).
- ``"cudnn"``: cuDNN flash attention (GPU) for training/prefill; XLA otherwise.
- ``"auto"``: ``pallas`` on TPU; on GPU ``cudnn`` where cuDNN covers the case,
  else the Mosaic GPU kernels (soft-cap, segment ids, cache attention); ``xla``
  on CPU.

Every case a kernel cannot take (shape, mask kind, soft-cap, sequence-sharded
mesh, ...) falls back to the XLA reference with one log line per reason.
Kernels run inside ``shard_map`` over the context mesh (``jax.set_mesh``) with
partition specs from the Flax logical-axis rules in context: batch over the
batch axes, heads over the head axes; the length axes must be unsharded.
"""

import functools
import logging

import jax
import jax.numpy as jnp
from flax import linen as nn

from cadenza.errors import ConfigError
from cadenza.lazy_exports import LazyModule
from cadenza.pallas_kernels.attention_reference import reference_attention
from cadenza.pallas_kernels.attention_xla import xla_attention

# The kernels import Pallas' TPU / GPU back ends (seconds); only the platform in use pays.
decode_gpu = LazyModule("cadenza.pallas_kernels.decode_attention_gpu")
decode_tpu = LazyModule("cadenza.pallas_kernels.decode_attention_tpu")
flash_cudnn = LazyModule("cadenza.pallas_kernels.flash_attention_cudnn")
flash_mgpu = LazyModule("cadenza.pallas_kernels.flash_attention_mosaic_gpu")
flash_tpu = LazyModule("cadenza.pallas_kernels.flash_attention_tpu")

IMPLEMENTATIONS = ("auto", "xla", "pallas", "cudnn")

_log = logging.getLogger(__name__)
_logged: set[str] = set()

_Q = ("batch", "length", "heads", "head_dim")
_KV = ("batch", "length", "kv_heads", "head_dim")
_CACHE = ("batch", "cache_length", "kv_heads", "head_dim")
_SCALE = ("batch", "cache_length", "kv_heads")
_LOGICAL = {"q": _Q, "k": _KV, "v": _KV, "k_cache": _CACHE, "v_cache": _CACHE,
            "k_scale": _SCALE, "v_scale": _SCALE,
            "cache_lengths": ("batch",), "cache_positions": ("batch", "cache_length"),
            "q_positions": ("batch", "length"), "segment_ids": ("batch", "length"),
            "window": ()}
_LENGTH_AXES = ("length", "cache_length")


def _fallback(reason: str):
    if reason not in _logged:
        _logged.add(reason)
        _log.warning("attention: falling back to XLA: %s", reason)


def _static_int(x):
    """``int(x)`` when ``x`` is concrete, else None (a traced per-layer window)."""
    try:
        return int(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return None


def compile_platform() -> str:
    """Platform the kernels compile for: the context mesh's devices (AOT for a TPU
    topology from a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform
    return jax.default_backend()


def _resolve(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"unknown attention implementation {implementation!r}",
                          where="model.attention_impl", fix=f"use one of {list(IMPLEMENTATIONS)}")
    if implementation != "auto":
        return implementation
    return {"tpu": "pallas", "gpu": "cudnn"}.get(compile_platform(), "xla")


def _mesh_specs(arrays: dict):
    """Partition specs of ``arrays`` under the context mesh: (specs, None) or (None, reason).

    ``specs`` is None when there is no context mesh (run the kernel directly).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, None
    specs = {}
    for name, x in arrays.items():
        logical = _LOGICAL[name] if name != "tail_mask" else (("batch",) * (x.ndim == 3)
                                                              + (None, None))
        spec = nn.logical_to_mesh_axes(logical)
        for size, axes, lname in zip(x.shape, spec, logical):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            shards = 1
            for a in axes:
                shards *= mesh.shape[a]
            if lname in _LENGTH_AXES and shards > 1:
                return None, f"{name} is sharded along its length (sequence parallelism)"
            if size % shards:
                return None, f"{name} dim {lname}={size} does not divide over mesh axes {axes}"
        specs[name] = spec
    return specs, None


def _run_sharded(fn, arrays: dict, specs):
    """``fn(**arrays)``, per shard inside ``shard_map`` when ``specs`` is not None."""
    if specs is None:
        return fn(**arrays)
    names = list(arrays)
    mapped = jax.shard_map(lambda *xs: fn(**dict(zip(names, xs))),
                           in_specs=tuple(specs[n] for n in names), out_specs=specs["q"],
                           check_vma=False)
    return mapped(*(arrays[n] for n in names))


def _flash_fn(impl, *, scale, window, logit_soft_cap):
    """The training/prefill kernel for one static window, as
    ``fn(q, k, v, segment_ids=None[, q_positions])`` (``q_positions`` for ``mosaic_gpu``)."""
    if impl == "pallas":
        return functools.partial(flash_tpu.flash_attention_tpu, scale=scale, window=window,
                                 logit_soft_cap=logit_soft_cap,
                                 interpret=compile_platform() == "cpu")
    if impl == "mosaic_gpu":
        return functools.partial(flash_mgpu.flash_attention_mosaic_gpu, scale=scale,
                                 window=window, logit_soft_cap=logit_soft_cap)
    return functools.partial(flash_cudnn.flash_attention_cudnn, scale=scale, window=window)


def attention(q, k, v, *, implementation: str = "xla", scale, q_positions, k_cache=None,
              v_cache=None, cache_lengths=None, cache_positions=None, tail_mask=None,
              segment_ids=None, window=0, window_choices=None, logit_soft_cap=0.0,
              k_scale=None, v_scale=None):
    """Attention of new tokens over an optional cache prefix plus themselves.

    Shapes and masking rules: see
    :func:`cadenza.pallas_kernels.attention_reference.reference_attention`.
    An int8 cache is passed as its codes (``k_cache``/``v_cache`` int8) with float32
    ``k_scale``/``v_scale`` [B, S, Hkv]: the cache kernels read the int8 tiles and
    scales themselves, the XLA reference dequantises the whole cache first.
    ``window_choices``: every value a traced ``window`` can take (the model's
    per-layer windows; a value outside it would select the first choice); lets
    static-mask kernels run under a scan over layers via ``lax.switch``.
    Without a cache the result is differentiable on every path; with a cache
    the Pallas path is forward-only (decoding).
    """
    impl = _resolve(implementation)
    kw = dict(scale=scale, q_positions=q_positions, k_cache=k_cache, v_cache=v_cache,
              cache_lengths=cache_lengths, cache_positions=cache_positions, tail_mask=tail_mask,
              segment_ids=segment_ids, window=window, logit_soft_cap=logit_soft_cap,
              k_scale=k_scale, v_scale=v_scale)
    out, reason = None, None
    backend = compile_platform()
    if impl == "xla":
        return _xla(q, k, v, kw)
    if backend == "gpu":
        out, reason = _gpu(impl, implementation == "auto", q, k, v, kw, window_choices)
    elif impl == "cudnn":
        reason = f"cuDNN needs a GPU backend, not {backend}"
    elif k_cache is not None:   # pallas on TPU (or CPU: interpret mode)
        reason = decode_tpu.unsupported_reason(k_cache)
        if reason is None:
            out, reason = _decode(q, k, v, kw, window_choices, interpret=backend == "cpu")
    else:
        reason = flash_tpu.unsupported_reason(q, tail_mask=tail_mask)
        if reason is None:
            out, reason = _flash_any_window(impl, q, k, v, kw, window_choices)
    if out is None:
        _fallback(f"{impl}: {reason}")
        return _xla(q, k, v, kw)
    return out


def _xla(q, k, v, kw):
    """Plain XLA: :func:`~cadenza.pallas_kernels.attention_xla.xla_attention` (hand-written
    VJP) for the new tokens alone without a soft-cap, else the reference."""
    if kw["k_cache"] is not None or kw["logit_soft_cap"]:
        return reference_attention(q, k, v, **kw)
    return xla_attention(q, k, v, scale=kw["scale"], q_positions=kw["q_positions"],
                         tail_mask=kw["tail_mask"], segment_ids=kw["segment_ids"],
                         window=kw["window"])


def _gpu(impl, auto, q, k, v, kw, window_choices):
    """GPU: cuDNN for training/prefill where it covers the case (``cudnn``, ``auto``), the
    Mosaic GPU kernels for ``pallas`` and for what cuDNN cannot take under ``auto``."""
    cache = kw["k_cache"] is not None
    reasons = []
    if impl == "cudnn":
        reason = ("cuDNN path has no cache attention" if cache else flash_cudnn.unsupported_reason(
            q, tail_mask=kw["tail_mask"], segment_ids=kw["segment_ids"],
            logit_soft_cap=kw["logit_soft_cap"]))
        if reason is None:
            out, reason = _flash_any_window("cudnn", q, k, v, kw, window_choices)
            if out is not None:
                return out, None
        if not auto:
            return None, reason
        reasons.append(f"cuDNN: {reason}")
    if cache:
        reason = decode_gpu.unsupported_reason(kw["k_cache"], q_dtype=q.dtype)
        if reason is None:
            out, reason = _decode(q, k, v, kw, window_choices, interpret=None, gpu=True)
    else:
        reason = flash_mgpu.unsupported_reason(q, tail_mask=kw["tail_mask"])
        if reason is None:
            out, reason = _flash_any_window("mosaic_gpu", q, k, v, kw, window_choices)
    if reason is None:
        return out, None
    return None, "; ".join(reasons + [f"Mosaic GPU: {reason}"])


def _decode(q, k, v, kw, window_choices, *, interpret, gpu=False):
    """The cache kernel (TPU, or Mosaic GPU when ``gpu``); on TPU the new tokens among
    themselves via splash for long causal chunks with a static window (prefill into a
    cache), else XLA."""
    arrays = {"q": q, "k": k, "v": v, "k_cache": kw["k_cache"], "v_cache": kw["v_cache"],
              "cache_lengths": kw["cache_lengths"], "cache_positions": kw["cache_positions"],
              "q_positions": kw["q_positions"]}
    for name in ("tail_mask", "segment_ids", "k_scale", "v_scale"):
        if kw[name] is not None:
            arrays[name] = kw[name]
    window = _static_int(kw["window"])
    if window is None and len(set(window_choices or ())) == 1:
        window = window_choices[0]
    splash_tail = (not gpu and q.shape[1] > 64 and window is not None
                   and flash_tpu.unsupported_reason(q, tail_mask=kw["tail_mask"]) is None)
    if window is None:
        arrays["window"] = jnp.asarray(kw["window"], jnp.int32)
    specs, reason = _mesh_specs(arrays)
    if reason:
        return None, reason
    if gpu:
        fn = functools.partial(decode_gpu.decode_attention_gpu, scale=kw["scale"],
                               logit_soft_cap=kw["logit_soft_cap"], interpret=interpret)
    else:
        fn = functools.partial(decode_tpu.decode_attention_tpu, scale=kw["scale"],
                               logit_soft_cap=kw["logit_soft_cap"], interpret=interpret,
                               splash_tail=splash_tail)
    if window is not None:
        fn = functools.partial(fn, window=window)
    return _run_sharded(fn, arrays, specs), None


def _flash_any_window(impl, q, k, v, kw, window_choices):
    """Static-window kernels for a possibly traced window: switch over its known values."""
    window = _static_int(kw["window"])
    choices = sorted(set(window_choices or ()))
    if window is None and len(choices) == 1:
        window = choices[0]
    if window is None and not choices:
        return None, "traced window without window_choices"
    arrays = {"q": q, "k": k, "v": v}
    if kw["segment_ids"] is not None:
        arrays["segment_ids"] = kw["segment_ids"]
    if impl == "mosaic_gpu":
        arrays["q_positions"] = kw["q_positions"]
    specs, reason = _mesh_specs(arrays)
    if reason:
        return None, reason

    def run(w):
        fn = _flash_fn(impl, scale=kw["scale"], window=w, logit_soft_cap=kw["logit_soft_cap"])
        return _run_sharded(fn, arrays, specs)

    if window is not None:
        return run(window), None
    index = sum(jnp.where(kw["window"] == c, i, 0) for i, c in enumerate(choices))
    return jax.lax.switch(index, [functools.partial(run, c) for c in choices]), None
