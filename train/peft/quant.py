"""Blockwise NF4 / int8 storage of frozen kernels (QLoRA), dequantised on the fly.

A kernel is flattened (C order), zero-padded to a multiple of the block size
and split into blocks; each block keeps its absmax and the codes of
``value / absmax``:

- ``nf4``: the index (0..15) of the nearest of the 16 NormalFloat4 levels,
  two indices per uint8 (high nibble first);
- ``int8``: ``round(127 * value / absmax)`` as int8.

With double quantisation the float32 absmax per block is itself stored as
int8 in blocks of ``double_quant_block_size`` after removing its mean
(linear absmax scaling of the centred values; bitsandbytes uses a dynamic
8-bit map instead). Quantised kernels are dicts of arrays with the
``QUANT_*`` keys; a stacked kernel (scanned layers, experts) is quantised per
layer and expert so the arrays carry the same leading axes (and shard like the
kernel along them).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

QUANT_CODES = "quant_codes"
QUANT_ABSMAX = "quant_absmax"
QUANT_ABSMAX_CODES = "quant_absmax_codes"
QUANT_ABSMAX_SCALE = "quant_absmax_scale"
QUANT_ABSMAX_MEAN = "quant_absmax_mean"
QUANT_KEYS = (QUANT_CODES, QUANT_ABSMAX, QUANT_ABSMAX_CODES, QUANT_ABSMAX_SCALE,
              QUANT_ABSMAX_MEAN)


@functools.cache
def nf4_levels() -> np.ndarray:
    """The 16 NF4 levels, ascending, in float32: normal quantiles at offset 0.9677083
    (8 positive, 7 negative, and 0), generated in float64 and scaled to [-1, 1]."""
    offset = 0.9677083
    pos = scipy.special.ndtri(np.linspace(offset, 0.5, 9)[:-1])
    neg = -scipy.special.ndtri(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([pos, [0.0], neg]))
    return (levels / np.abs(levels).max()).astype(np.float32)


def _blocks(n: int, block: int) -> int:
    return math.ceil(n / block)


def quantize(w, quant_type: str, block_size: int, double_quant: bool, dq_block_size: int):
    """Quantise one (unstacked) kernel of any shape; returns the dict of arrays."""
    flat = w.astype(jnp.float32).reshape(-1)
    nb = _blocks(flat.size, block_size)
    blocks = jnp.pad(flat, (0, nb * block_size - flat.size)).reshape(nb, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    normed = blocks / safe[:, None]
    if quant_type == "nf4":
        levels = jnp.asarray(nf4_levels())
        idx = jnp.searchsorted((levels[1:] + levels[:-1]) / 2, normed.reshape(-1))
        idx = idx.astype(jnp.uint8).reshape(-1, 2)
        codes = (idx[:, 0] << 4) | idx[:, 1]
    else:
        codes = jnp.round(normed * 127).astype(jnp.int8).reshape(-1)
    out = {QUANT_CODES: codes}
    if not double_quant:
        out[QUANT_ABSMAX] = absmax
        return out
    mean = jnp.mean(absmax)
    nb2 = _blocks(nb, dq_block_size)
    centred = jnp.pad(absmax - mean, (0, nb2 * dq_block_size - nb)).reshape(nb2, dq_block_size)
    scale = jnp.max(jnp.abs(centred), axis=1) / 127
    safe_scale = jnp.where(scale > 0, scale, 1.0)
    out[QUANT_ABSMAX_CODES] = jnp.round(centred / safe_scale[:, None]).astype(jnp.int8).reshape(-1)
    out[QUANT_ABSMAX_SCALE] = scale
    out[QUANT_ABSMAX_MEAN] = mean
    return out


def dequantize(q, shape, quant_type: str, block_size: int, dq_block_size: int,
               dtype=jnp.float32):
    """The kernel of ``shape`` back from :func:`quantize`'s dict, in ``dtype``."""
    n = math.prod(shape)
    nb = _blocks(n, block_size)
    if QUANT_ABSMAX in q:
        absmax = q[QUANT_ABSMAX]
    else:
        scaled = q[QUANT_ABSMAX_CODES].astype(jnp.float32).reshape(-1, dq_block_size)
        absmax = (scaled * q[QUANT_ABSMAX_SCALE][:, None]).reshape(-1)[:nb] + q[QUANT_ABSMAX_MEAN]
    codes = q[QUANT_CODES]
    if quant_type == "nf4":
        idx = jnp.stack([codes >> 4, codes & 15], axis=1).reshape(-1)
        normed = jnp.asarray(nf4_levels())[idx]
    else:
        normed = codes.astype(jnp.float32) / 127
    w = normed.reshape(nb, block_size) * absmax[:, None]
    return w.reshape(-1)[:n].reshape(shape).astype(dtype)


def _over_lead(fn, lead: int):
    for _ in range(lead):
        fn = jax.vmap(fn)
    return fn


def quantize_stacked(w, lead: int, **kw):
    """:func:`quantize` of each kernel of ``w`` after its ``lead`` stacking axes (layers,
    experts): the arrays of the result carry those axes first."""
    return _over_lead(functools.partial(quantize, **kw), lead)(w)


def dequantize_stacked(q, shape, lead: int, **kw):
    """Inverse of :func:`quantize_stacked`; ``shape`` is one kernel's (no stacking axes)."""
    return _over_lead(functools.partial(dequantize, shape=shape, **kw), lead)(q)
