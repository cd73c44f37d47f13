"""Selective fine-tuning: train part of the model's own weights (no adapters).

``peft.method`` (with ``train.init_from`` as the starting point):

- ``partial``: the params whose path (``layers.attn.q_proj.kernel``, ``embed.embedding``,
  ``lm_head.kernel``, ...) fully matches ``peft.trainable`` (default: all), and of the
  stacked layer params only the layers ``peft.trainable_layers`` (default: all).
- ``lisa`` (LISA): every ``peft.period`` steps, ``peft.lisa_layers`` (gamma) of the L
  layers are sampled uniformly without replacement; they, the embeddings, the LM head and
  the final norm train, the other layers stay frozen. The optimizer state exists only for
  a static ``[gamma, ...]`` slice of each stacked layer param, gathered from the stack and
  scattered back, and is reset (moments zeroed) at every resample.
- ``hft`` (Half Fine-Tuning): every ``peft.period`` steps (a stage) a random half of the
  weight matrices (each layer's slice of each stacked param, and each other param, counts
  as one) trains and the other half stays frozen.

All three are an optax wrapper around the configured optimizer
(:func:`selective_optimizer`): the step still differentiates the whole model, the
wrapper turns the gradients of frozen parts into zero updates (frozen params stay bit
for bit) and keeps optimizer state only for what trains. The sampled layers, the stage
mask and the sampling key live in the optimizer state, so a checkpoint restores them and
a resumed run samples exactly as an uninterrupted one.
"""

import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cadenza.errors import ConfigError

SELECTIVE_METHODS = ("partial", "lisa", "hft")
LAYERS_PREFIX = "layers."


def param_path(path) -> str:
    """A param's dotted path, e.g. ``layers.attn.q_proj.kernel``."""
    return jax.tree_util.keystr(path, simple=True, separator=".")


class SelectiveState(NamedTuple):
    """Optimizer state of :func:`selective_optimizer`.

    ``inner``: the wrapped optimizer's state of the trained view (full leaves and
    ``[gamma, ...]`` layer slices); ``layers``: int32 [gamma] the layers trained now;
    ``units``: HFT: per param, bool [L] (stacked) or [] (trains in this stage); other
    methods: an unused bool [1];
    ``key``: uint32 key data of the sampling RNG; ``count``: int32 updates done.
    """

    inner: Any
    layers: jax.Array
    units: Any
    key: jax.Array
    count: jax.Array


def _plan(abstract, peft, num_layers):
    """Per param leaf: "all" (trains whole), "rows" (its stacked layer rows
    ``layers`` train) or "none"; and the static initial layer indices."""
    paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    if peft.method == "partial":
        pattern = peft.trainable or ".*"
        rows = list(peft.trainable_layers) or list(range(num_layers))
        kinds = []
        for path in paths:
            if not re.fullmatch(pattern, path):
                kinds.append("none")
            elif path.startswith(LAYERS_PREFIX) and len(rows) < num_layers:
                kinds.append("rows")
            else:
                kinds.append("all")
        if all(k == "none" for k in kinds):
            raise ConfigError(f"peft.trainable={pattern!r} matches no param",
                              where="peft.trainable",
                              fix=f"match some of {paths[:4]} ... (dotted param paths)")
        return kinds, rows
    if peft.method == "lisa":
        return ["rows" if p.startswith(LAYERS_PREFIX) else "all" for p in paths], None
    return ["all"] * len(paths), None


def selective_optimizer(tx: optax.GradientTransformation, abstract_params, peft, num_layers: int,
                        seed: int = 0) -> optax.GradientTransformation:
    """``tx`` restricted to the part of ``abstract_params`` that ``peft`` (method partial |
    lisa | hft) trains (module docstring). Updates of frozen parts are exact zeros."""
    leaves, treedef = jax.tree.flatten(abstract_params)
    kinds, static_rows = _plan(abstract_params, peft, num_layers)
    method, period = peft.method, peft.period
    gamma = len(static_rows) if static_rows is not None else peft.lisa_layers
    paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]]
    stacked = [p.startswith(LAYERS_PREFIX) for p in paths]

    def sample(key):
        """(layers [gamma], units) for the period starting now."""
        k1, k2 = jax.random.split(key)
        if method == "lisa":
            layers = jnp.sort(jax.random.choice(k1, num_layers, (gamma,), replace=False))
        else:
            layers = jnp.asarray(static_rows if static_rows is not None else range(gamma),
                                 jnp.int32)
        units = jnp.zeros((1,), bool)   # unused (checkpoints hold no empty arrays)
        if method == "hft":   # exactly half of all matrices (rounded down) train
            units = []
            sizes = [num_layers if s else 1 for s in stacked]
            order = jax.random.permutation(k2, sum(sizes)) < sum(sizes) // 2
            start = 0
            for size, s in zip(sizes, stacked):
                units.append(order[start:start + size] if s else order[start])
                start += size
        return layers.astype(jnp.int32), units

    def view(tree, layers):
        return [x[layers] if k == "rows" else x for x, k in zip(tree, kinds) if k != "none"]

    def init(params):
        # From the shapes only (optimizer states start at zeros), so that optax's
        # tree_map_params (state shardings) sees the same structure as a real init.
        del params
        key = jax.random.key(seed)
        layers, units = sample(key)
        zeros = [jnp.zeros(x.shape, x.dtype) for x in leaves]
        return SelectiveState(inner=tx.init(view(zeros, layers)), layers=layers, units=units,
                              key=jax.random.key_data(key), count=jnp.zeros((), jnp.int32))

    def update(grads, state, params=None):
        flat_g, flat_p = jax.tree.leaves(grads), jax.tree.leaves(params)
        layers, units, key, inner = state.layers, state.units, state.key, state.inner
        if method in ("lisa", "hft"):
            resample = (state.count > 0) & (state.count % period == 0)
            next_key = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(key))[0])
            key = jnp.where(resample, next_key, key)
            new_layers, new_units = sample(jax.random.wrap_key_data(key))
            layers = jnp.where(resample, new_layers, layers)
            if method == "hft":
                units = [jnp.where(resample, n, o) for n, o in zip(new_units, units)]
            if method == "lisa":   # fresh moments for the new slice (counts kept)
                fresh = tx.init(view(flat_p, layers))
                inner = jax.tree.map(lambda f, o: jnp.where(resample, f, o) if o.ndim else o,
                                     fresh, inner)
        if method == "hft":
            flat_g = [g * _expand(u, g) for g, u in zip(flat_g, units)]
        upd, inner = tx.update(view(flat_g, layers), inner, view(flat_p, layers))
        upd, out = iter(upd), []
        for g, p, k, i in zip(flat_g, flat_p, kinds, range(len(kinds))):
            if k == "none":
                out.append(jnp.zeros_like(p))
            elif k == "rows":
                out.append(jnp.zeros_like(p).at[layers].set(next(upd).astype(p.dtype)))
            else:
                u = next(upd)
                out.append(u * _expand(units[i], u).astype(u.dtype) if method == "hft" else u)
        return jax.tree.unflatten(treedef, out), SelectiveState(inner, layers, units, key,
                                                                state.count + 1)

    return optax.GradientTransformation(init, update)


def _expand(unit, x):
    """A per-layer [L] (or scalar) mask broadcast against ``x`` [L, ...] (or any shape)."""
    unit = unit.astype(jnp.float32)
    return unit.reshape(unit.shape + (1,) * (x.ndim - unit.ndim))


def trained_fraction(abstract_params, peft, num_layers: int) -> tuple[int, int]:
    """``(params with optimizer state, total params)`` under ``peft``."""
    kinds, rows = _plan(abstract_params, peft, num_layers)
    gamma = len(rows) if rows is not None else peft.lisa_layers
    total = held = 0
    for x, k in zip(jax.tree.leaves(abstract_params), kinds):
        n = math.prod(x.shape)
        total += n
        held += 0 if k == "none" else n * gamma // x.shape[0] if k == "rows" else n
    return held, total


def selective_task(config, neftune_alpha: float = 0.0):
    """Full-model :class:`~cadenza.train.task.TrainTask` (from ``train.init_from``) whose
    optimizer is :func:`selective_optimizer`; prints the optimizer memory saved."""
    import dataclasses

    from cadenza.models import abstract_params
    from cadenza.train.task import full_model_task

    model = config.model
    if not model.scan_layers and config.peft.method != "partial":
        raise ConfigError(f"peft.method={config.peft.method} samples layers of the stacked "
                          "layer params", where="model.scan_layers", fix="set it to true")
    bad = [i for i in config.peft.trainable_layers if not 0 <= i < model.num_layers]
    if bad:
        raise ConfigError(f"trainable_layers {bad} outside 0..{model.num_layers - 1}",
                          where="peft.trainable_layers", fix="give layer indices of the model")
    if config.peft.lisa_layers > model.num_layers:
        raise ConfigError(f"lisa_layers={config.peft.lisa_layers} > {model.num_layers} layers",
                          where="peft.lisa_layers", fix="sample at most num_layers layers")
    abstract = abstract_params(model)
    held, total = trained_fraction(abstract, config.peft, model.num_layers)
    print(f"peft {config.peft.method}: optimizer state for {held:,} / {total:,} params "
          f"({100 * held / total:.1f}%); Adam memory saved "
          f"{8 * (total - held) / (1 << 20):.1f} MiB")
    inner = full_model_task(model, neftune_alpha=neftune_alpha, init_from=config.train.init_from)
    return dataclasses.replace(   # the step still computes every gradient (MFU counts all)
        inner, wrap_optimizer=lambda tx: selective_optimizer(tx, abstract, config.peft,
                                                      model.num_layers, config.train.seed))

