"""Building blocks of the decoder: RMSNorm, rotary embeddings, attention, MLP.

Every parameter carries logical axis names (``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``vocab``) that the mesh rules map to
devices. Projections are :class:`Projection` modules named ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj`` and
``down_proj`` so adapters can intercept them by module path.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cadenza.models import quant
from cadenza.models.cache import as_cached, read_layer
from cadenza.models.config import ModelConfig
from cadenza.pallas_kernels.attention import attention


def flat_operands(x, kernel, n_in: int):
    """``x`` [..., *in] and ``kernel`` [*in, *out] as the 2-D operands of one matmul:
    ``(x [rows, prod(in)], kernel [prod(in), prod(out)], output shape [..., *out])``
    (reshapes of contiguous dims only)."""
    lead, ins, outs = x.shape[:x.ndim - n_in], kernel.shape[:n_in], kernel.shape[n_in:]
    k_in, k_out = math.prod(ins), math.prod(outs)
    return x.reshape(math.prod(lead), k_in), kernel.reshape(k_in, k_out), lead + outs


def flat_matmul(x, kernel, n_in: int):
    """``x`` [..., *in] contracted with ``kernel`` [*in, *out] -> [..., *out], as one 2-D
    matmul [rows, prod(in)] @ [prod(in), prod(out)] (:func:`flat_operands`).

    Same math as a ``dot_general`` over the ``n_in`` trailing dims, but its gradient
    w.r.t. the kernel is a plain 2-D ``x^T @ dy``: contracting the batch and length dims
    of 3-D operands instead makes XLA's CPU backend copy a transposed ``dy`` for every
    weight gradient (about a fifth of a small model's train step).
    """
    x2, k2, out_shape = flat_operands(x, kernel, n_in)
    return jnp.dot(x2, k2).reshape(out_shape)


class Projection(nn.Module):
    """A linear map contracting the last ``len(in_axes)`` input dims into ``features``.

    The kernel has shape ``in_shape + features`` and logical axes
    ``in_axes + out_axes``; the optional bias has shape ``features``. (Flax's
    DenseGeneral initialises a flattened kernel, which breaks logical
    sharding constraints under a global mesh, hence this small module.)
    Adapters intercept its ``__call__`` by module path. With ``config.weight_quant``
    set and no ``kernel`` in its params, it reads that weight-only format instead
    (:func:`cadenza.models.quant.project`).
    """

    features: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    config: ModelConfig
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        n_in, n_out = len(self.in_axes), len(self.features)
        if (cfg.weight_quant != "none" and not self.is_initializing()
                and not self.has_variable("params", "kernel")):
            return self._quantized(x)
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)),
            out_axis=tuple(range(n_in, n_in + n_out)))
        axes = self.in_axes + self.out_axes
        kernel = self.param("kernel", nn.with_logical_partitioning(init, axes),
                            x.shape[-n_in:] + tuple(self.features), jnp.dtype(cfg.param_dtype))
        dtype = jnp.dtype(cfg.dtype)
        y = flat_matmul(x.astype(dtype), kernel.astype(dtype), n_in)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                   self.out_axes),
                              tuple(self.features), jnp.dtype(cfg.param_dtype))
            y = y + bias.astype(dtype)
        return y

    def _quantized(self, x):
        """The projection with the config's weight-only format in place of ``kernel``."""
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        q = {name: self.get_variable("params", name) for name in self.variables["params"]
             if name != "bias"}
        y = quant.project(x, q, len(self.in_axes), self.features, cfg.weight_quant, dtype)
        if self.use_bias:
            y = y + self.get_variable("params", "bias").astype(dtype)
        return y


class RMSNorm(nn.Module):
    """``x / rms(x) * w`` (or ``* (1 + w)`` when ``plus_one``, Gemma), computed in float32.

    Normalises over the last ``len(axes)`` dims of ``x``; the scale has their
    shape and the logical ``axes`` (``("embed",)`` for the residual stream,
    ``("head_dim",)`` for a per-head q/k norm, ``("heads", "head_dim")`` for
    OLMoE's norm over all heads).
    """

    config: ModelConfig
    axes: tuple[str, ...] = ("embed",)

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        init = nn.initializers.zeros_init() if cfg.norm_plus_one else nn.initializers.ones_init()
        n = len(self.axes)
        scale = self.param("scale", nn.with_logical_partitioning(init, self.axes),
                           x.shape[-n:], jnp.dtype(cfg.param_dtype))
        xf = x.astype(jnp.float32)
        dims = tuple(range(x.ndim - n, x.ndim))
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=dims, keepdims=True) + cfg.norm_eps)
        w = scale.astype(jnp.float32)
        y = y * (1.0 + w if cfg.norm_plus_one else w)
        return y.astype(jnp.dtype(cfg.dtype))


def rope_inv_freq(config: ModelConfig, local: bool = False) -> jnp.ndarray:
    """Inverse frequencies [head_dim // 2] in float32, with the configured scaling.

    ``local``: those of sliding-window layers, which use ``local_rope_theta``
    unscaled when it is set (Gemma 3).
    """
    d = config.resolved_head_dim
    exponents = jnp.arange(0, d, 2, dtype=jnp.float32) / d
    if local and config.local_rope_theta:
        return 1.0 / (config.local_rope_theta ** exponents)
    inv = 1.0 / (config.rope_theta ** exponents)
    rs = config.rope_scaling
    if rs.type == "linear":
        inv = inv / rs.factor
    elif rs.type == "llama3":
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = ((rs.original_max_position_embeddings / wavelen - rs.low_freq_factor)
                  / (rs.high_freq_factor - rs.low_freq_factor))
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def apply_rope(x, positions, inv_freq):
    """Rotate ``x`` [B, T, H, D] by ``positions`` [B, T] (rotate-half layout, as in HF)."""
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    xf = x.astype(jnp.float32)
    half = xf.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE over an optional KV-cache prefix.

    ``layer_cache``: None or one layer of a :class:`~cadenza.models.cache.KVCache`
    (``KVCache.layer``; an int8 layer is dequantised here, before attention).
    Returns the output [B, T, embed] and this layer's new keys/values
    ([B, T, kv_heads, head_dim] each) for the caller to write into the cache.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, ctx, window, layer_cache):
        cfg = self.config
        hd = cfg.resolved_head_dim
        q = Projection((cfg.num_heads, hd), ("embed",), ("heads", "head_dim"), cfg,
                       use_bias=cfg.qkv_bias, name="q_proj")(x)
        k = Projection((cfg.num_kv_heads, hd), ("embed",), ("kv_heads", "head_dim"), cfg,
                       use_bias=cfg.qkv_bias, name="k_proj")(x)
        v = Projection((cfg.num_kv_heads, hd), ("embed",), ("kv_heads", "head_dim"), cfg,
                       use_bias=cfg.qkv_bias, name="v_proj")(x)
        if cfg.qk_norm == "head":
            q = RMSNorm(cfg, ("head_dim",), name="q_norm")(q)
            k = RMSNorm(cfg, ("head_dim",), name="k_norm")(k)
        elif cfg.qk_norm == "full":
            q = RMSNorm(cfg, ("heads", "head_dim"), name="q_norm")(q)
            k = RMSNorm(cfg, ("kv_heads", "head_dim"), name="k_norm")(k)
        inv_freq = rope_inv_freq(cfg)
        if cfg.local_rope_theta:  # window is a traced per-layer value under scan
            inv_freq = jnp.where(jnp.asarray(window) > 0, rope_inv_freq(cfg, local=True),
                                 inv_freq)
        q = apply_rope(q, ctx.positions, inv_freq)
        k = apply_rope(k, ctx.positions, inv_freq)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        k_cache, v_cache, k_scale, v_scale = read_layer(layer_cache)
        k_att, v_att = as_cached(k, layer_cache), as_cached(v, layer_cache)
        out = attention(q, k_att, v_att, implementation=cfg.attention_impl,
                        scale=cfg.attention_scale,
                        q_positions=ctx.positions, k_cache=k_cache, v_cache=v_cache,
                        k_scale=k_scale, v_scale=v_scale,
                        cache_lengths=ctx.cache_lengths, cache_positions=ctx.cache_positions,
                        tail_mask=ctx.tail_mask, segment_ids=ctx.segment_ids, window=window,
                        window_choices=tuple(cfg.layer_windows()),
                        logit_soft_cap=cfg.attn_logit_softcap)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        y = Projection((cfg.hidden_size,), ("heads", "head_dim"), ("embed",), cfg,
                       name="o_proj")(out)
        return y, (k, v)


class MLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))`` with SiLU (SwiGLU) or tanh-GELU (GeGLU).

    ``width``: the hidden width (0: ``config.intermediate_size``).
    """

    config: ModelConfig
    width: int = 0

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        f = self.width or cfg.intermediate_size
        gate = Projection((f,), ("embed",), ("mlp",), cfg, name="gate_proj")(x)
        up = Projection((f,), ("embed",), ("mlp",), cfg, name="up_proj")(x)
        act = nn.silu if cfg.activation == "silu" else (lambda g: nn.gelu(g, approximate=True))
        h = nn.with_logical_constraint(act(gate) * up, ("batch", "length", "mlp"))
        return Projection((cfg.hidden_size,), ("mlp",), ("embed",), cfg, name="down_proj")(h)
