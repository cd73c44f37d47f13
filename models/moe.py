"""Mixture-of-experts MLP: a dropless top-k router and grouped expert matmuls.

Each token's router logits (float32) go through a softmax over all experts;
the ``num_experts_per_tok`` most probable experts are kept, their
probabilities renormalised to sum to 1 when ``norm_topk_prob`` (Mixtral
always; Qwen3-MoE and OLMoE as configured). No token is ever dropped: the
(token, expert) pairs are sorted by expert and each expert's gated MLP runs on
exactly its rows with one ``jax.lax.ragged_dot`` per projection (a grouped
matmul over contiguous row groups), then the weighted outputs are summed back
per token.

Params (per layer): ``router/kernel`` [embed, expert]; ``gate_proj``,
``up_proj`` [expert, embed, expert_mlp]; ``down_proj`` [expert, expert_mlp,
embed]. The logical ``expert`` axis maps to the ``expert`` mesh axis (expert
parallelism), ``expert_mlp`` to ``tensor``.

The router logits of every layer are sown in the ``intermediates``
collection under ``router_logits`` ([tokens, experts] per layer);
:func:`router_losses` turns them into the load-balancing and z-losses.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cadenza.models.config import ModelConfig
from cadenza.models.layers import Projection


def route(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Top-``k`` experts per token from router ``logits`` [N, E] (any float dtype).

    Returns ``(weights [N, k] float32, experts [N, k] int32)``: softmax
    probabilities (float32) of the chosen experts, renormalised over them
    when ``normalize``.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def grouped_mlp(x, experts, gate, up, down, activation):
    """Dropless expert MLPs: row ``n`` of ``x`` [N, D] through the experts ``experts`` [N, k].

    ``gate``/``up`` [E, D, F], ``down`` [E, F, D]. Returns [N, k, D]: slot ``j`` of
    token ``n`` is ``down_e(act(gate_e(x_n)) * up_e(x_n))`` with ``e = experts[n, j]``.
    Rows are sorted by expert so each expert's rows are contiguous and one
    ``ragged_dot`` per projection computes all experts.
    """
    n, k = experts.shape
    num_experts = gate.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = x[order // k]
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    h = activation(jax.lax.ragged_dot(rows, gate, sizes)) * jax.lax.ragged_dot(rows, up, sizes)
    out = jax.lax.ragged_dot(h.astype(x.dtype), down, sizes)
    return jnp.zeros_like(out).at[order].set(out).reshape(n, k, -1)


class MoEMLP(nn.Module):
    """The MoE replacement of :class:`~cadenza.models.layers.MLP`: [B, T, embed] -> same."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.expert_size
        logits = Projection((e,), ("embed",), ("expert",), cfg, name="router")(x)
        b, t = x.shape[:2]
        logits = logits.reshape(b * t, e).astype(jnp.float32)
        self.sow("intermediates", "router_logits", logits)
        weights, experts = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)

        def kernel(name, shape, axes):
            init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                    in_axis=1, out_axis=2, batch_axis=(0,))
            return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                              pdtype).astype(dtype)

        gate = kernel("gate_proj", (e, d, f), ("expert", "embed", "expert_mlp"))
        up = kernel("up_proj", (e, d, f), ("expert", "embed", "expert_mlp"))
        down = kernel("down_proj", (e, f, d), ("expert", "expert_mlp", "embed"))
        act = nn.silu if cfg.activation == "silu" else (lambda g: nn.gelu(g, approximate=True))
        tokens = x.reshape(b * t, d).astype(dtype)
        out = grouped_mlp(tokens, experts, gate, up, down, act)
        y = jnp.einsum("nkd,nk->nd", out, weights.astype(dtype))
        return y.reshape(b, t, d)


def router_losses(router_logits: jax.Array, k: int) -> dict[str, jax.Array]:
    """Load-balancing and z-loss of the router logits of all layers, [L, N, E] (or [N, E]).

    ``load_balancing``: ``E * sum_e f_e * P_e`` over the tokens of all layers
    pooled (Switch Transformer; the definition transformers' ``load_balancing_loss_func``
    uses): ``f_e`` the fraction of top-``k`` slots routed to expert ``e`` (per slot
    rank, summed over ranks), ``P_e`` the mean router probability of ``e``; ``k`` when
    perfectly balanced. ``z_loss``: mean over tokens of
    ``logsumexp(logits)**2`` (ST-MoE). Both float32 scalars.
    """
    logits = router_logits.reshape(-1, router_logits.shape[-1]).astype(jnp.float32)
    e = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    _, chosen = jax.lax.top_k(probs, k)
    slots = jnp.mean(jax.nn.one_hot(chosen, e, dtype=jnp.float32), axis=0)  # [k, E]
    balance = e * jnp.sum(slots * jnp.mean(probs, axis=0)[None, :])
    z = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    return {"load_balancing": balance, "z_loss": z}


def collected_router_losses(intermediates, k: int) -> dict[str, jax.Array]:
    """:func:`router_losses` of the router logits a model apply sowed (scanned or not).

    ``intermediates``: the ``intermediates`` collection returned by
    ``Transformer.apply(..., mutable=["intermediates"])``.
    """
    leaves = jax.tree.leaves(intermediates)
    e = leaves[0].shape[-1]
    return router_losses(jnp.concatenate([x.reshape(-1, e) for x in leaves]), k)
