"""The preallocated KV cache: an explicit pytree passed into and out of the model.

Slots at or past ``lengths[b]`` hold garbage and are always masked (masks
come from ``lengths``, never from contents), so rolling back rejected
tokens is just lowering ``lengths``. The model writes the keys/values of
its new tokens at ``[lengths[b], lengths[b] + T)`` and returns the cache with
``lengths`` unchanged; the caller decides how many to keep
(:meth:`KVCache.advance`).
"""

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
    """Per-layer keys/values stacked on a leading layer axis.

    Attributes:
      k, v: [layers, batch, max_len, kv_heads, head_dim].
      positions: int32 [batch, max_len] position of each slot (for sliding
        windows; slot index and position differ for token trees).
      lengths: int32 [batch] number of valid slots per row.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, config, batch: int, max_len: int, dtype=None) -> "KVCache":
        """An empty cache for ``config`` (a ModelConfig); dtype defaults to the compute dtype."""
        dtype = dtype or jnp.dtype(config.dtype)
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.resolved_head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   positions=jnp.zeros((batch, max_len), jnp.int32),
                   lengths=jnp.zeros((batch,), jnp.int32))

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
        def row(k, v, pos, kn, vn, pn, start):
            k = jax.lax.dynamic_update_slice(k, kn.astype(k.dtype), (0, start, 0, 0))
            v = jax.lax.dynamic_update_slice(v, vn.astype(v.dtype), (0, start, 0, 0))
            pos = jax.lax.dynamic_update_slice(pos, pn.astype(pos.dtype), (start,))
            return k, v, pos

        k, v, pos = jax.vmap(row, in_axes=(1, 1, 0, 1, 1, 0, 0), out_axes=(1, 1, 0))(
            self.k, self.v, self.positions, k_new, v_new, positions, self.lengths)
        return self.replace(k=k, v=v, positions=pos)
