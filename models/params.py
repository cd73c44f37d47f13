"""Parameter creation and layout: sharded init, logical shardings, layer stacking."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cadenza.models.config import ModelConfig
from cadenza.models.transformer import Transformer
from cadenza.train.config import MeshConfig


def _init_fn(config: ModelConfig):
    model = Transformer(config)

    def init(rng):
        tokens = jnp.zeros((1, 1), jnp.int32)
        return model.init(rng, tokens)["params"]

    return init


def abstract_params(config: ModelConfig):
    """Pytree of ``jax.ShapeDtypeStruct`` matching the params (nothing allocated)."""
    return nn.meta.unbox(jax.eval_shape(_init_fn(config), jax.random.key(0)))


def logical_param_specs(config: ModelConfig):
    """Pytree of logical ``PartitionSpec`` s (axis names like 'embed') matching the params."""
    boxed = jax.eval_shape(_init_fn(config), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def param_shardings(config: ModelConfig, mesh: Mesh, rules=None):
    """``NamedSharding`` per param on ``mesh`` under logical-axis ``rules``
    (default: :data:`cadenza.config.DEFAULT_LOGICAL_AXIS_RULES`)."""
    rules = MeshConfig().rules() if rules is None else rules
    return nn.logical_to_mesh_sharding(logical_param_specs(config), mesh, rules)


def init_params(config: ModelConfig, rng, mesh: Mesh | None = None, rules=None):
    """Fresh params as a plain nested dict of arrays.

    With a ``mesh``, each param is created directly in its shard (one jit
    with ``out_shardings``; no device ever holds the whole model unless the
    rules replicate it). ``rng`` is a ``jax.random.key``.
    """
    init = _init_fn(config)
    if mesh is None:
        return nn.meta.unbox(jax.jit(init)(rng))
    shardings = param_shardings(config, mesh, rules)
    return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)


def unstack_layers(params, num_layers: int):
    """Scanned layout (``layers`` with a leading layer axis) -> ``layer_0 ... layer_{n-1}``.

    Each layer's arrays are fresh buffers (copies of the slices). Arrays on one device are
    sliced in host memory and put back in one transfer (no per-slice program to compile:
    this is on ``cadenza generate``'s start-up path); sharded arrays are sliced on device.
    """
    params = dict(params)
    stacked = params.pop("layers")
    leaves, treedef = jax.tree.flatten(stacked)
    local = [k for k, a in enumerate(leaves) if isinstance(a, jax.Array)
             and not isinstance(a, jax.core.Tracer) and len(a.sharding.device_set) == 1]
    placed = set(local)
    host = jax.device_get([leaves[k] for k in local])
    devices = [jax.sharding.SingleDeviceSharding(*leaves[k].sharding.device_set) for k in local]
    moved = jax.device_put([h[i] for i in range(num_layers) for h in host],
                           devices * num_layers)
    for i in range(num_layers):
        layer = [None if k in placed else a[i] for k, a in enumerate(leaves)]
        for j, k in enumerate(local):
            layer[k] = moved[i * len(local) + j]
        params[f"layer_{i}"] = jax.tree.unflatten(treedef, layer)
    return params


def decode_layout(model, params):
    """``(model, params)`` to decode with: on CPU, a scanned Transformer becomes the same
    model unrolled, with its params unstacked (one copy of the layer weights per call).

    Why: inside a decoding loop XLA's CPU backend copies each layer's slice of the
    stacked weights on every step (a dynamic slice it cannot hoist out of the loop), which
    made scanned decoding 1.1-1.7x slower than unrolled; separate per-layer buffers are
    read in place. Elsewhere (GPU, TPU: slices are read in place; memory matters more), for
    unscanned models and for anything but a plain ``Transformer`` (adapter-wrapped models)
    the pair is returned unchanged. Logits are the same either way. A forward with a
    ``decode_layout(params)`` method of its own (the multi-adapter forward) is asked instead.
    """
    if hasattr(model, "decode_layout"):
        return model.decode_layout(params)
    cfg = getattr(model, "config", None)
    if (type(model) is not Transformer or not cfg.scan_layers or jax.default_backend() != "cpu"
            or not isinstance(params, dict) or "layers" not in params):
        return model, params   # (params not in the scanned layout: left for validation)
    unrolled = Transformer(dataclasses.replace(cfg, scan_layers=False))
    return unrolled, unstack_layers(params, cfg.num_layers)


def stack_layers(params, num_layers: int):
    """Unscanned layout -> scanned layout (inverse of :func:`unstack_layers`)."""
    params = dict(params)
    layers = [params.pop(f"layer_{i}") for i in range(num_layers)]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return params
