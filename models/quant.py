"""The quantised weight formats of cadenza, dequantised inside the matmul.

Two families of formats live here (the only place that defines them):

1. Blockwise NF4 / int8 storage (QLoRA's frozen base, and ``--quantize nf4``):
   :func:`quantize` / :func:`dequantize` below.
2. Per-projection weight-only formats for decoding (``model.weight_quant``):
   ``int8`` per output channel and ``int4`` group-wise along the contraction,
   plus ``nf4`` (format 1 with :data:`NF4_BLOCK` and no double quantisation).
   :func:`quantize_kernel` builds the arrays that replace a Projection's
   ``kernel`` in the params tree; :func:`project` is the matmul that reads them;
   :func:`quantize_params` converts a whole params tree by module-path rules.

Blockwise format: a kernel is flattened (C order), zero-padded to a multiple of the block size
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

import dataclasses
import functools
import math
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np

from cadenza.errors import ConfigError

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
    quantile = np.vectorize(NormalDist().inv_cdf)
    pos = quantile(np.linspace(offset, 0.5, 9)[:-1])
    neg = -quantile(np.linspace(offset, 0.5, 8)[:-1])
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


# ----- per-projection weight-only formats (decoding) -------------------------------------------

NF4_BLOCK = 64          # QLoRA's block size
QWEIGHT = "qweight"     # int8 [*in, *out] (int8); uint8 [K_padded / 2, *out] (int4, 2 codes)
QSCALE = "qscale"       # float32 [*out] (int8); [ceil(K / group), *out] (int4)


def quantize_kernel(w, n_in: int, scheme: str, group: int = 128) -> dict:
    """Quantise one (unstacked) kernel [*in, *out] whose first ``n_in`` dims are contracted.

    ``int8``: per output channel, ``scale = absmax over the inputs / 127`` and
    ``qweight = round(w / scale)`` (int8, kernel-shaped): the error is at most
    ``absmax / 254`` per element. ``int4``: symmetric groups of ``group`` consecutive
    inputs (C order; the inputs are zero-padded to a multiple of ``group``) per output
    channel, ``scale = absmax / 7``, codes in [-7, 7] packed two per uint8 (even input
    in the low nibble; :func:`pack_int4`, which also holds the code -8 of imported
    checkpoints, see :mod:`cadenza.models.hf_quant`). ``nf4``: :func:`quantize`
    with :data:`NF4_BLOCK`. Returns the dict of arrays that replaces ``kernel``.
    """
    w = w.astype(jnp.float32)
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    if scheme == "nf4":
        return quantize(w, "nf4", NF4_BLOCK, False, 256)
    if scheme == "int8":
        absmax = jnp.max(jnp.abs(w), axis=tuple(range(n_in)))
        scale = jnp.where(absmax > 0, absmax, 1.0) / 127
        return {QWEIGHT: jnp.round(w / scale).astype(jnp.int8), QSCALE: scale}
    if scheme == "int4":
        k = math.prod(in_shape)
        padded = _blocks(k, group) * group
        flat = jnp.pad(w.reshape((k,) + out_shape), [(0, padded - k)] + [(0, 0)] * len(out_shape))
        grouped = flat.reshape((padded // group, group) + out_shape)
        absmax = jnp.max(jnp.abs(grouped), axis=1)
        scale = jnp.where(absmax > 0, absmax, 1.0) / 7
        codes = jnp.round(grouped / scale[:, None]).astype(jnp.int8).reshape((padded,) + out_shape)
        return {QWEIGHT: pack_int4(codes, group), QSCALE: scale}
    raise ValueError(f"unknown weight scheme {scheme!r}")


def pack_int4(codes, group: int):
    """int4 codes [K, *out] (integers in [-8, 7]) as :data:`QWEIGHT`: the K inputs
    zero-padded to a multiple of ``group``, two codes per uint8 (even input in the low
    nibble, two's complement): uint8 [K_padded / 2, *out]."""
    k = codes.shape[0]
    padded = _blocks(k, group) * group
    codes = jnp.pad(jnp.asarray(codes, jnp.int8), [(0, padded - k)] + [(0, 0)] * (codes.ndim - 1))
    nibbles = (codes & 15).astype(jnp.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4)


def dequantize_kernel(q: dict, shape, n_in: int, scheme: str, dtype=jnp.float32):
    """The kernel of ``shape`` ([*in, *out]) back from :func:`quantize_kernel`'s dict."""
    if scheme == "nf4":
        return dequantize(q, shape, "nf4", NF4_BLOCK, 256, dtype)
    if scheme == "int8":
        return (q[QWEIGHT].astype(jnp.float32) * q[QSCALE]).astype(dtype)
    out_shape = tuple(shape[n_in:])
    k = math.prod(shape[:n_in])
    packed, scale = q[QWEIGHT], q[QSCALE]
    low = (packed & 15).astype(jnp.int8)
    high = (packed >> 4).astype(jnp.int8)
    codes = jnp.stack([low, high], axis=1).reshape((2 * packed.shape[0],) + out_shape)
    codes = jnp.where(codes > 7, codes - 16, codes)            # sign of the 4-bit codes
    w = codes.reshape((scale.shape[0], -1) + out_shape).astype(jnp.float32) * scale[:, None]
    return w.reshape((-1,) + out_shape)[:k].reshape(shape).astype(dtype)


def tie_to_step(x, q):
    """``(x, q)`` unchanged, through one optimisation barrier: the stored arrays ``q`` of a
    quantised kernel (any pytree) become part of the step that computes the activation
    ``x``. Without it, XLA hoists their dequantisation out of a loop whose params are
    loop-invariant (decoding's ``lax.while_loop`` over tokens) and keeps a float copy of
    every kernel for the whole loop: the float model's memory and, each step, its weight
    bytes. Differentiable (the identity)."""
    return jax.lax.optimization_barrier((x, q))


def project(x, q: dict, n_in: int, out_shape, scheme: str, dtype):
    """``x`` [..., *in] times a quantised kernel: [..., *out] in ``dtype``.

    int8 multiplies by the int8 codes (converted to ``dtype``, exact in bfloat16 too),
    accumulates in float32 and applies the float32 per-channel scale there, rounding to
    ``dtype`` once (the dequantised kernel's product, without a bfloat16 scale);
    int4 and nf4 dequantise the kernel in float32, cast it to ``dtype`` inside the
    jitted step and multiply.

    ``x`` and ``q`` pass :func:`tie_to_step` first.
    """
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    x, q = tie_to_step(x.astype(dtype), q)
    if scheme == "int8":
        y = jax.lax.dot_general(x, q[QWEIGHT].astype(dtype), (contract, ((), ())),
                                preferred_element_type=jnp.float32)
        return (y * q[QSCALE]).astype(dtype)
    shape = x.shape[-n_in:] + tuple(out_shape)
    w = dequantize_kernel(q, shape, n_in, scheme, dtype)
    return jax.lax.dot_general(x, w, (contract, ((), ())))


def quantize_params(params, config, scheme: str | None = None, targets: str | None = None):
    """Params of the float model ``config`` with the projections matching ``targets``
    (``re.fullmatch`` on module paths such as ``layers.attn.q_proj``, ``lm_head``; see
    :mod:`cadenza.train.peft.sites`) quantised to ``scheme`` (default: the config's
    ``weight_quant`` / ``weight_quant_targets``). Each targeted ``kernel`` is replaced
    by :func:`quantize_kernel`'s arrays (per layer under a leading layer axis); biases,
    norms, embeddings and mixture-of-experts expert kernels stay as they are. Returns a new
    tree (unchanged arrays shared).
    """
    from cadenza.train.peft.sites import get_path, projection_sites, select_sites

    scheme = scheme or config.weight_quant
    targets = targets if targets is not None else config.weight_quant_targets
    if scheme == "none":
        return params
    float_config = dataclasses.replace(config, weight_quant="none")
    # mixture-of-experts expert kernels stay float (their grouped matmul reads float weights)
    sites = [s for s in select_sites(projection_sites(float_config), targets,
                                     where="--quantize-targets") if not s.experts]
    params = jax.tree.map(lambda a: a, params)
    for s in sites:
        if s.path[0] == "layers" and "layers" not in params:
            raise ConfigError("params are unrolled (layer_0 ...) but the config scans layers",
                              where="quantize_params", fix="quantise the scanned params")
        module = get_path(params, s.path)
        fn = jax.jit(functools.partial(quantize_kernel, n_in=len(s.in_shape), scheme=scheme,
                                       group=config.weight_quant_group))
        kernel = module.pop("kernel")
        module.update(jax.vmap(fn)(kernel) if s.layers else fn(kernel))
    return params



def quantize_model(config, params, scheme: str, targets: str | None = None,
                   group: int | None = None):
    """``(config, params)`` of a loaded float model (an ExperimentConfig and its params)
    with the weights quantised to ``scheme`` (``int8``, ``int4``, ``nf4``): the config's
    ``model.weight_quant*`` fields record the scheme, targets and int4 group.

    ``targets`` (a regex, see :func:`quantize_params`) defaults to
    :data:`~cadenza.models.config.DEFAULT_QUANT_TARGETS`, every projection but
    ``lm_head`` (the targets a float model's config records are not read: they mean
    nothing until it is quantised). On a model already quantised, a call with the same
    scheme and no other targets or group returns it unchanged.

    CadenzaError when the model is already quantised (to another scheme, or to the same
    scheme with other targets or group): re-quantising loses precision twice."""
    from cadenza.errors import CadenzaError
    from cadenza.models.config import DEFAULT_QUANT_TARGETS

    mc = config.model
    if targets is None:
        targets = mc.weight_quant_targets if mc.weight_quant != "none" else DEFAULT_QUANT_TARGETS
    fields = {"weight_quant": scheme, "weight_quant_targets": targets,
              "weight_quant_group": mc.weight_quant_group if group is None else group}
    new = dataclasses.replace(mc, **fields)
    if mc.weight_quant != "none":
        if new == mc:
            return config, params
        raise CadenzaError(f"the model is already quantised ({mc.weight_quant}, targets "
                           f"{mc.weight_quant_targets!r}, group {mc.weight_quant_group})",
                           where="--quantize",
                           fix="start from the float model directory, or drop --quantize")
    return dataclasses.replace(config, model=new), quantize_params(params, new)


def count_quantized(params) -> int:
    """Projection sites of ``params`` held in a quantised format (a stacked site counts once)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(1 for path, _ in leaves if getattr(path[-1], "key", None) in (QWEIGHT, QUANT_CODES))
