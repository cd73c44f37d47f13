"""NEFTune: uniform noise on input embeddings during training (Jain et al., 2023)."""

import jax
import jax.numpy as jnp


def neftune_noise(embeddings, segment_ids, key, alpha: float):
    """``embeddings + U(-1, 1) * alpha / sqrt(L * d)`` on real (non-padding) tokens.

    ``L`` is the length of the token's own segment, so a packed row gets the
    noise each of its examples would get alone (the NEFTune reference scales by
    the unpadded length of each example).

    Args:
      embeddings: float ``[B, T, d]`` input embeddings (``Transformer.embed_tokens``).
      segment_ids: int ``[B, T]``; 0 marks padding (no noise there), 1.. the packed
        segments.
      key: a PRNG key (fold in the step for fresh noise each step).
      alpha: the noise scale (the paper uses 5 to 15); 0 returns ``embeddings``.

    Returns embeddings of the same shape and dtype. Call it in the training step
    only; evaluation and decoding use clean embeddings.
    """
    if alpha == 0:
        return embeddings
    d = embeddings.shape[-1]
    t = segment_ids.shape[-1]
    real = (segment_ids > 0)
    counts = jax.vmap(lambda s: jnp.bincount(s, length=t + 1))(segment_ids)    # [B, T + 1]
    length = jnp.take_along_axis(counts, segment_ids, axis=-1).astype(jnp.float32)
    scale = alpha / jnp.sqrt(jnp.maximum(length, 1.0) * d)                      # [B, T]
    noise = jax.random.uniform(key, embeddings.shape, jnp.float32, -1.0, 1.0)
    noise = noise * scale[..., None] * real[..., None]
    return (embeddings.astype(jnp.float32) + noise).astype(embeddings.dtype)
