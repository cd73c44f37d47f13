"""The decoder-only transformer: one Flax module for training and decoding.

``Transformer(config).apply({"params": params}, tokens, ...)`` returns
``(logits, hidden, cache)``. Training passes tokens (and segment ids when
packing); decoding passes a :class:`~cadenza.models.cache.KVCache` and gets
it back with the new tokens' keys/values written in (lengths unchanged).
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from cadenza.models.cache import KVCache
from cadenza.models.config import ModelConfig
from cadenza.models.layers import MLP, Attention, Projection, RMSNorm
from cadenza.models.moe import MoEMLP
from cadenza.pallas_kernels.attention import compile_platform

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


@flax.struct.dataclass
class AttentionContext:
    """Per-call attention inputs shared by all layers (see ``attention_reference``)."""

    positions: jax.Array
    tail_mask: jax.Array | None
    segment_ids: jax.Array | None
    cache_lengths: jax.Array | None
    cache_positions: jax.Array | None


class Block(nn.Module):
    """One pre-norm decoder layer (with Gemma-2's extra post-norms when configured)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, layer_cache, window, ctx):
        cfg = self.config
        h, new_kv = Attention(cfg, name="attn")(RMSNorm(cfg, name="attn_norm")(x), ctx, window,
                                                layer_cache)
        h = checkpoint_name(h, "attn_out")
        if cfg.post_norms:
            h = RMSNorm(cfg, name="attn_post_norm")(h)
        x = x + h
        mlp = MoEMLP if cfg.is_moe else MLP
        h = mlp(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x))
        if cfg.post_norms:
            h = RMSNorm(cfg, name="mlp_post_norm")(h)
        x = nn.with_logical_constraint(x + h, ("batch", "length", "embed"))
        return x, new_kv


def _block_cls(config: ModelConfig):
    if config.remat_policy == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[config.remat_policy],
                    prevent_cse=not config.scan_layers)


def scan_unroll(config: ModelConfig) -> int:
    """How many layers one iteration of the layer scan runs: all of them when compiling for
    CPU, else 1 (a real loop).

    Same params layout and math either way. Why: as a loop, XLA's CPU backend fills a
    zeroed [layers, ...] buffer for every activation the backward pass reads and slices
    each layer's weights and activations out of their stacks; unrolled, each layer reads
    its arrays in place (the 10M model's train step took about 14% less CPU time).
    Accelerators keep the loop (compile time and memory of deep models).
    """
    return config.num_layers if compile_platform() == "cpu" else 1


class Transformer(nn.Module):
    """Decoder-only transformer for every family in :mod:`cadenza.models.families`.

    Params layout: ``embed/embedding`` [vocab, embed]; ``layers/...``
    stacked on a leading ``layers`` axis when ``scan_layers`` (else
    ``layer_0/... layer_{n-1}/...``); ``final_norm/scale``; ``lm_head/kernel``
    [embed, vocab] unless embeddings are tied. MoE models sow each layer's
    router logits in ``intermediates`` (see :mod:`cadenza.models.moe`).
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("vocab", "embed")))
        if cfg.scan_layers:
            self.layers = nn.scan(
                _block_cls(cfg), variable_axes={"params": 0, "peft": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, 0, nn.broadcast), length=cfg.num_layers,
                unroll=scan_unroll(cfg),
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        else:
            self.layers = [_block_cls(cfg)(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = Projection((cfg.vocab_size,), ("embed",), ("vocab",), cfg)

    def embed_tokens(self, tokens):
        """Raw embedding rows [B, T, embed] for ``tokens`` (no Gemma scaling)."""
        return self.embed(tokens)

    def __call__(self, tokens=None, *, embeddings=None, positions=None, segment_ids=None,
                 attention_mask=None, cache: KVCache | None = None, logits_at=None):
        """Run the model on a block of T new tokens per row.

        Args:
          tokens: int32 [B, T], or None when ``embeddings`` are given.
          embeddings: [B, T, embed] raw input embeddings (as from
            :meth:`embed_tokens`); Gemma's sqrt(embed) scaling is applied here.
          positions: int32 [B, T]; default ``cache.lengths[:, None] + arange(T)``
            (``arange(T)`` without a cache).
          segment_ids: int32 [B, T] for packed rows: tokens attend only within
            their segment (positions must then restart per segment).
          attention_mask: bool [T, T] or [B, T, T] visibility among the new
            tokens (tree ancestry, placeholders); default causal.
          cache: a KVCache. Queries see its first ``cache.lengths[b]`` slots.
          logits_at: int32 [B, K] indices into the T new tokens: logits are
            computed only there (decoding reads one or a few rows, not [B, T, V]).

        Returns:
          logits [B, T, vocab] float32 ([B, K, vocab] with ``logits_at``),
          hidden [B, T, embed] (after the final
          norm), and the cache with the new keys/values written at
          ``[lengths, lengths + T)`` (lengths unchanged), or None.
        """
        cfg = self.config
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens or embeddings")
        x = self.embed_tokens(tokens) if embeddings is None else embeddings.astype(cfg.dtype)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(cfg.hidden_size ** 0.5, dtype=x.dtype)
        b, t = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            if cache is not None:
                positions = positions + cache.lengths[:, None]
        ctx = AttentionContext(
            positions=positions.astype(jnp.int32), tail_mask=attention_mask,
            segment_ids=segment_ids,
            cache_lengths=None if cache is None else cache.lengths,
            cache_positions=None if cache is None else cache.positions)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        windows = cfg.layer_windows()
        if cfg.scan_layers:
            layer_caches = None if cache is None else cache.layers()
            x, (k_new, v_new) = self.layers(x, layer_caches, jnp.asarray(windows, jnp.int32), ctx)
        else:
            new = []
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else cache.layer(i)
                x, kv = layer(x, layer_cache, windows[i], ctx)
                new.append(kv)
            k_new = jnp.stack([kv[0] for kv in new])
            v_new = jnp.stack([kv[1] for kv in new])
        hidden = self.final_norm(x)
        read = hidden if logits_at is None else jnp.take_along_axis(
            hidden, logits_at[..., None].astype(jnp.int32), axis=1)
        if cfg.tie_embeddings:
            logits = self.embed.attend(read)
        else:
            logits = self.lm_head(read)
        logits = logits.astype(jnp.float32)
        if cfg.final_logit_softcap:
            logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        if cache is not None:
            # Every layer has read the cache by now (hidden depends on all of them); the
            # barrier makes XLA write after those reads, so it updates the cache in place
            # inside a decoding loop instead of copying it twice per step (XLA's CPU backend
            # did, as soon as the step's tokens came from the previous step's logits).
            logits, hidden, cache = jax.lax.optimization_barrier((logits, hidden, cache))
            cache = cache.write(k_new, v_new, positions)
        return logits, hidden, cache
