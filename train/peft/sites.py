"""Where adapters can attach: the model's projection modules, found by tracing.

A :class:`Site` is one ``cadenza.models.layers.Projection`` of the model, or
one ``cadenza.models.moe.ExpertProjection`` (all experts' kernels of one
projection of a mixture-of-experts layer), named by its module path joined
with dots (``layers.attn.q_proj`` when layers are scanned,
``layer_3.attn.q_proj`` otherwise, ``layers.mlp.gate_proj`` for the experts'
gate projections of an MoE model, ``lm_head``).
Targets are chosen by ``re.fullmatch`` of a regex against these names.
"""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from cadenza.errors import ConfigError
from cadenza.models.config import ModelConfig
from cadenza.models.layers import Projection
from cadenza.models.moe import ExpertProjection
from cadenza.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class Site:
    """One projection: kernel [*in_shape, *out_shape] with logical axes in_axes + out_axes.

    ``layers`` is the number of stacked layers when the kernel lives under the
    scanned ``layers`` subtree (a leading layer axis on every array), else 0.
    ``experts`` is the number of experts of an expert projection (the kernel
    and every adapter array then have an ``expert`` axis after any layer
    axis: kernel [E, *in_shape, *out_shape]), else 0.
    """

    path: tuple[str, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    use_bias: bool
    layers: int
    experts: int = 0

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def lead(self) -> tuple[int, ...]:
        """Shape prefix of the kernel and its adapter arrays: (layers?, experts?)."""
        return ((self.layers,) if self.layers else ()) + self.expert_shape

    @property
    def lead_axes(self) -> tuple[str, ...]:
        """Logical axes of :attr:`lead`."""
        return (("layers",) if self.layers else ()) + (("expert",) if self.experts else ())

    @property
    def expert_shape(self) -> tuple[int, ...]:
        """(experts,) for an expert projection, else ()."""
        return (self.experts,) if self.experts else ()

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The kernel's shape within one layer: [experts?, *in_shape, *out_shape]."""
        return self.expert_shape + self.in_shape + self.out_shape


def projection_sites(config: ModelConfig) -> list[Site]:
    """All projection sites of the model ``config`` builds, in call order (traced, no FLOPs)."""
    found: dict[tuple[str, ...], Site] = {}
    layers = config.num_layers if config.scan_layers else 0

    def record(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, (Projection, ExpertProjection)) and context.method_name == "__call__":
            n_in = len(m.in_axes)
            path = tuple(m.path)
            found[path] = Site(path=path, in_shape=tuple(args[0].shape[-n_in:]),
                               out_shape=tuple(m.features), in_axes=tuple(m.in_axes),
                               out_axes=tuple(m.out_axes), use_bias=m.use_bias,
                               layers=layers if path[0] == "layers" else 0,
                               experts=getattr(m, "num_experts", 0))
        return next_fun(*args, **kwargs)

    def init(rng):
        with nn.intercept_methods(record):
            return Transformer(config).init(rng, jnp.zeros((1, 1), jnp.int32))

    jax.eval_shape(init, jax.random.key(0))
    return list(found.values())


def select_sites(sites: list[Site], pattern: str, where: str = "peft.targets") -> list[Site]:
    """The sites whose name fully matches ``pattern``; fails clearly if none does."""
    regex = re.compile(pattern)
    chosen = [s for s in sites if regex.fullmatch(s.name)]
    if not chosen:
        names = sorted({s.name for s in sites})
        raise ConfigError(f"target regex {pattern!r} matches no projection of the model",
                          where=where,
                          fix=f"match (re.fullmatch) some of: {', '.join(names)}")
    return chosen


def get_path(tree, path):
    """``tree[path[0]][path[1]]...``."""
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path, value) -> None:
    """Set ``tree[path...] = value``, creating nested dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
