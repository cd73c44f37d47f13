"""The preallocated KV cache: an explicit pytree passed into and out of the model.

Slots at or past ``lengths[b]`` hold garbage and are always masked (masks
come from ``lengths``, never from contents), so rolling back rejected
tokens is just lowering ``lengths``. The model writes the keys/values of
its new tokens at ``[lengths[b], lengths[b] + T)`` and returns the cache with
``lengths`` unchanged; the caller decides how many to keep
(:meth:`KVCache.advance`).

An int8 cache (``KVCache.create(..., dtype=jnp.int8)``) stores keys and values as
int8 codes with a float32 scale per token and kv head (``absmax over head_dim /
127``), quantised on write; attention reads the codes and scales
(:meth:`KVCache.layer`, :func:`read_layer`) and dequantises them itself (the XLA
reference per layer, the Pallas cache kernels per tile): (head_dim + 4) bytes per token
and head instead of 2 * head_dim (bf16) or 4 * head_dim (float32).
"""

import flax.struct
import jax
import jax.numpy as jnp

from cadenza.pallas_kernels.attention_reference import dequantize


@flax.struct.dataclass
class KVCache:
    """Per-layer keys/values stacked on a leading layer axis.

    Attributes:
      k, v: [layers, batch, max_len, kv_heads, head_dim].
      positions: int32 [batch, max_len] position of each slot (for sliding
        windows; slot index and position differ for token trees).
      lengths: int32 [batch] number of valid slots per row.
      k_scale, v_scale: float32 [layers, batch, max_len, kv_heads] for an int8 cache
        (k, v then hold int8 codes), else None.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    lengths: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @classmethod
    def create(cls, config, batch: int, max_len: int, dtype=None) -> "KVCache":
        """An empty cache for ``config`` (a ModelConfig); dtype defaults to the compute
        dtype; ``jnp.int8`` (or "int8") makes an int8 cache with per-token, per-head scales."""
        dtype = jnp.dtype(dtype or config.dtype)
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.resolved_head_dim)
        scales = {}
        if dtype == jnp.int8:
            scales = {"k_scale": jnp.zeros(shape[:-1], jnp.float32),
                      "v_scale": jnp.zeros(shape[:-1], jnp.float32)}
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   positions=jnp.zeros((batch, max_len), jnp.int32),
                   lengths=jnp.zeros((batch,), jnp.int32), **scales)

    @property
    def quantized(self) -> bool:
        """Whether keys/values are int8 codes with scales."""
        return self.k_scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the key/value storage (codes and scales; not positions/lengths)."""
        return sum(a.size * a.dtype.itemsize for a in (self.k, self.v, self.k_scale, self.v_scale)
                   if a is not None)

    def layers(self) -> tuple:
        """What the model's layer scan slices per layer: ``(k, v)`` or, int8,
        ``(k, v, k_scale, v_scale)``, each with the leading layer axis."""
        return (self.k, self.v) + ((self.k_scale, self.v_scale) if self.quantized else ())

    def layer(self, i: int) -> tuple:
        """Layer ``i`` of :meth:`layers`."""
        return tuple(a[i] for a in self.layers())

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def advance(self, n) -> "KVCache":
        """Keep ``n`` more slots per row (int or int32 [batch])."""
        return self.replace(lengths=self.lengths + jnp.asarray(n, jnp.int32))

    def with_lengths(self, lengths) -> "KVCache":
        """Set the valid length of every row (rollback or ragged prefill)."""
        return self.replace(lengths=jnp.broadcast_to(jnp.asarray(lengths, jnp.int32),
                                                     self.lengths.shape))

    def write(self, k_new, v_new, positions) -> "KVCache":
        """Write new tokens at ``[lengths[b], lengths[b] + T)`` of every row.

        Args:
          k_new, v_new: [layers, batch, T, kv_heads, head_dim].
          positions: int32 [batch, T].

        The caller must ensure ``lengths + T <= max_len``: XLA clamps an
        out-of-range start, which would overwrite valid slots.
        """
        pos = jax.vmap(lambda p, pn, start: jax.lax.dynamic_update_slice(
            p, pn.astype(p.dtype), (start,)))(self.positions, positions, self.lengths)
        if self.quantized:
            (kq, ks), (vq, vs) = quantize_kv(k_new), quantize_kv(v_new)
            k, v, k_scale, v_scale = (_write_rows(a, n, self.lengths) for a, n in
                                      ((self.k, kq), (self.v, vq), (self.k_scale, ks),
                                       (self.v_scale, vs)))
            return self.replace(k=k, v=v, k_scale=k_scale, v_scale=v_scale, positions=pos)
        return self.replace(k=_write_rows(self.k, k_new, self.lengths),
                            v=_write_rows(self.v, v_new, self.lengths), positions=pos)


def _write_rows(dst, new, starts):
    """``dst`` [layers, batch, S, ...] with ``new`` [layers, batch, T, ...] written at slot
    ``starts[b]`` of every row (cast to ``dst``'s dtype)."""
    def row(d, n, start):
        return jax.lax.dynamic_update_slice(d, n.astype(d.dtype),
                                            (0, start) + (0,) * (d.ndim - 2))

    return jax.vmap(row, in_axes=(1, 1, 0), out_axes=1)(dst, new, starts)


def quantize_kv(x):
    """Keys or values [..., head_dim] -> ``(int8 codes, float32 scales [...])`` with
    ``scale = absmax over head_dim / 127`` (1/127 for an all-zero vector); the inverse is
    :func:`cadenza.pallas_kernels.attention_reference.dequantize`."""
    xf = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(xf), axis=-1)
    scale = jnp.where(absmax > 0, absmax, 1.0) / 127
    return jnp.round(xf / scale[..., None]).astype(jnp.int8), scale


def read_layer(layer_cache):
    """One layer's ``(k, v, k_scale, v_scale)`` from :meth:`KVCache.layer`, as attention
    takes them: int8 codes [B, S, Hkv, D] with float32 scales [B, S, Hkv] for an int8
    layer, else the keys/values with ``None`` scales; all ``None`` without a cache."""
    if layer_cache is None:
        return None, None, None, None
    if len(layer_cache) == 2:
        return (*layer_cache, None, None)
    return layer_cache


def as_cached(x, layer_cache):
    """New keys or values [..., head_dim] as a later step will read them back from this
    layer's cache: round-tripped through int8 when the cache is int8, else ``x``.

    Attending to these (not the float ones) within the step that writes them makes a
    block of T tokens see what T single-token steps would see (speculative verification
    stays identical to greedy decoding over an int8 cache)."""
    if layer_cache is None or len(layer_cache) == 2:
        return x
    return dequantize(*quantize_kv(x), x.dtype)
