"""Mixture-of-experts MLP: a dropless top-k router and grouped expert matmuls.

Each token's router logits (float32) go through a softmax over all experts;
the ``num_experts_per_tok`` most probable experts are kept, their
probabilities renormalised to sum to 1 when ``norm_topk_prob`` (Mixtral
always; Qwen2-MoE, Qwen3-MoE and OLMoE as configured). No token is ever
dropped: the (token, expert) pairs are sorted by expert and each expert's
gated MLP runs on exactly its rows with one ``jax.lax.ragged_dot`` per
projection (a grouped matmul over contiguous row groups,
:class:`ExpertProjection`), then the weighted outputs are summed back per
token. Qwen2-MoE adds a shared expert (a gated MLP of width
``shared_expert_size`` every token goes through), scaled per token by
``sigmoid(shared_expert_gate(x))``.

Params (per layer): ``router/kernel`` [embed, expert]; ``gate_proj/kernel``,
``up_proj/kernel`` [expert, embed, expert_mlp]; ``down_proj/kernel`` [expert,
expert_mlp, embed]; with a shared expert also ``shared_expert/{gate,up,down}_proj/kernel``
(logical ``mlp`` width) and ``shared_expert_gate/kernel`` [embed, 1]. The logical
``expert`` axis maps to the ``expert`` mesh axis (expert parallelism),
``expert_mlp`` to ``tensor``.

The router logits of every layer are sown in the ``intermediates``
collection under ``router_logits`` ([tokens, experts] per layer);
:func:`router_losses` turns them into the load-balancing and z-losses.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cadenza.models.config import ModelConfig
from cadenza.models.layers import MLP, Projection


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


def sort_by_expert(experts: jax.Array, num_experts: int):
    """Group the (token, slot) pairs of ``experts`` [N, k] by expert.

    Returns ``(order [N*k], group_sizes [num_experts] int32)``: ``order`` lists the
    flattened pairs sorted (stably) by expert, so row ``order[j] // k`` of the tokens
    is the ``j``-th row of the grouped input; expert ``e`` owns ``group_sizes[e]``
    consecutive rows.
    """
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return order, jnp.bincount(flat, length=num_experts).astype(jnp.int32)


def row_experts(group_sizes: jax.Array, rows: int) -> jax.Array:
    """The expert [rows] int32 of each row of a grouped input with ``group_sizes``."""
    return jnp.repeat(jnp.arange(group_sizes.shape[0], dtype=jnp.int32), group_sizes,
                      total_repeat_length=rows)


class ExpertProjection(nn.Module):
    """Every expert's linear map at once: rows [M, in] grouped by expert -> [M, out].

    The kernel is [experts, in, out] with logical axes ``("expert",) + in_axes +
    out_axes``; rows ``[sum(group_sizes[:e]), sum(group_sizes[:e+1]))`` go through
    expert ``e``'s slice (one ``jax.lax.ragged_dot``). ``features`` is ``(out,)``.
    Adapters intercept its ``__call__`` by module path like a
    :class:`~cadenza.models.layers.Projection`.
    """

    num_experts: int
    features: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    config: ModelConfig
    use_bias: bool = False

    @nn.compact
    def __call__(self, rows, group_sizes):
        cfg = self.config
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=1, out_axis=2, batch_axis=(0,))
        kernel = self.param("kernel", nn.with_logical_partitioning(
            init, ("expert",) + self.in_axes + self.out_axes),
            (self.num_experts, rows.shape[-1]) + tuple(self.features),
            jnp.dtype(cfg.param_dtype))
        dtype = jnp.dtype(cfg.dtype)
        return jax.lax.ragged_dot(rows.astype(dtype), kernel.astype(dtype), group_sizes)


class MoEMLP(nn.Module):
    """The MoE replacement of :class:`~cadenza.models.layers.MLP`: [B, T, embed] -> same."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        e, d, f, k = cfg.num_experts, cfg.hidden_size, cfg.expert_size, cfg.num_experts_per_tok
        logits = Projection((e,), ("embed",), ("expert",), cfg, name="router")(x)
        b, t = x.shape[:2]
        logits = logits.reshape(b * t, e).astype(jnp.float32)
        self.sow("intermediates", "router_logits", logits)
        weights, experts = route(logits, k, cfg.norm_topk_prob)

        def proj(name, out, in_axis, out_axis):
            return ExpertProjection(e, (out,), (in_axis,), (out_axis,), cfg, name=name)

        act = nn.silu if cfg.activation == "silu" else (lambda g: nn.gelu(g, approximate=True))
        order, sizes = sort_by_expert(experts, e)
        rows = x.reshape(b * t, d).astype(dtype)[order // k]
        h = (act(proj("gate_proj", f, "embed", "expert_mlp")(rows, sizes))
             * proj("up_proj", f, "embed", "expert_mlp")(rows, sizes))
        out = proj("down_proj", d, "expert_mlp", "embed")(h.astype(dtype), sizes)
        out = jnp.zeros_like(out).at[order].set(out).reshape(b * t, k, d)
        y = jnp.einsum("nkd,nk->nd", out, weights.astype(dtype)).reshape(b, t, d)
        if cfg.shared_expert_size:
            shared = MLP(cfg, cfg.shared_expert_size, name="shared_expert")(x)
            gate = Projection((1,), ("embed",), (None,), cfg, name="shared_expert_gate")(x)
            y = y + jax.nn.sigmoid(gate) * shared
        return y


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
