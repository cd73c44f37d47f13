"""Device meshes from :class:`~cadenza.config.MeshConfig`, validated before any compile."""

import math

import jax
from jax.sharding import AxisType, Mesh

from cadenza.errors import ConfigError
from cadenza.train.config import MESH_AXES, MeshConfig


def resolve_axis_sizes(mesh_config: MeshConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes with the -1 axis filled in; fails unless they multiply to ``num_devices``."""
    sizes = {a: getattr(mesh_config, a) for a in MESH_AXES}
    known = math.prod(s for s in sizes.values() if s != -1)
    free = [a for a, s in sizes.items() if s == -1]
    if free:
        if num_devices % known:
            raise ConfigError(
                f"the fixed mesh axes multiply to {known}, which does not divide the "
                f"{num_devices} devices, so mesh.{free[0]}=-1 cannot take the rest",
                where="mesh", fix=f"choose fixed axis sizes whose product divides {num_devices}")
        sizes[free[0]] = num_devices // known
    total = math.prod(sizes.values())
    if total != num_devices:
        shown = ", ".join(f"{a}={s}" for a, s in sizes.items())
        raise ConfigError(f"mesh axes ({shown}) multiply to {total}, but there are "
                          f"{num_devices} devices", where="mesh",
                          fix="make the product equal the device count, or set one axis to -1")
    return sizes


def make_mesh(mesh_config: MeshConfig | None = None, devices=None) -> Mesh:
    """A mesh with axes ``(data, fsdp, tensor, sequence)`` over ``devices`` (default: all)."""
    mesh_config = mesh_config or MeshConfig()
    devices = jax.devices() if devices is None else list(devices)
    sizes = resolve_axis_sizes(mesh_config, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: shardings follow the logical-axis constraints (GSPMD style).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


# Logical axis -> the model config field that sets its size (for error messages).
_AXIS_FIELDS = {"embed": "hidden_size", "heads": "num_heads", "kv_heads": "num_kv_heads",
                "head_dim": "head_dim", "mlp": "intermediate_size", "vocab": "vocab_size",
                "layers": "num_layers", "expert": "num_experts",
                "expert_mlp": "moe_intermediate_size"}


def _mesh_axes_of(rules: dict[str, list[str]], logical: str) -> list[str]:
    return list(rules.get(logical) or [])


def validate_sharding(config, num_devices: int) -> dict[str, int]:
    """Check an :class:`~cadenza.config.ExperimentConfig` against ``num_devices`` before compiling.

    Checks: ``train.seq_len`` fits the model's ``max_position_embeddings``; the mesh axes
    multiply to ``num_devices``; the global batch and
    each microbatch divide over the axes ``batch`` is sharded on; ``seq_len``
    divides over the ``length`` axes; and every param dimension divides over
    the mesh axes its logical axis maps to (heads, kv_heads, mlp, vocab,
    embed, ...). Returns the resolved axis sizes. Raises ConfigError naming
    the numbers and a fix.
    """
    from cadenza.models.params import abstract_params, logical_param_specs

    if config.train.seq_len > config.model.max_position_embeddings:
        raise ConfigError(
            f"train.seq_len={config.train.seq_len} is longer than the model's "
            f"max_position_embeddings={config.model.max_position_embeddings}",
            where="train.seq_len", fix="lower train.seq_len, or raise "
            "model.max_position_embeddings if the model supports longer positions")
    sizes = resolve_axis_sizes(config.mesh, num_devices)
    rules = config.mesh.logical_axis_rules
    train = config.train

    def product(axes):
        return math.prod(sizes[a] for a in axes)

    def shown(axes):
        return "*".join(f"{a}={sizes[a]}" for a in axes)

    batch_axes = _mesh_axes_of(rules, "batch")
    n = product(batch_axes)
    micro = train.batch_size // train.microbatches
    if train.batch_size % n or micro % n:
        what = (f"train.batch_size={train.batch_size}" if train.batch_size % n else
                f"the microbatch size {micro} (batch_size={train.batch_size} / "
                f"microbatches={train.microbatches})")
        raise ConfigError(f"{what} is not divisible by the {n} batch shards ({shown(batch_axes)})",
                          where="train.batch_size",
                          fix=f"make batch_size / microbatches a multiple of {n}, or shrink "
                              f"mesh axes {batch_axes}")
    length_axes = _mesh_axes_of(rules, "length")
    n = product(length_axes)
    if train.seq_len % n:
        raise ConfigError(f"train.seq_len={train.seq_len} is not divisible by the {n} sequence "
                          f"shards ({shown(length_axes)})", where="train.seq_len",
                          fix=f"choose seq_len a multiple of {n}, or mesh.sequence=1")

    shapes = abstract_params(config.model)
    specs = logical_param_specs(config.model)
    for (path, spec), leaf in zip(jax.tree_util.tree_leaves_with_path(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
            jax.tree.leaves(shapes)):
        used: set[str] = set()
        for dim, logical in zip(leaf.shape, spec):
            if logical is None:
                continue
            # Flax skips a mesh axis already used by an earlier dimension.
            axes = [a for a in _mesh_axes_of(rules, logical) if a not in used]
            used.update(axes)
            n = product(axes)
            if dim % n:
                field = _AXIS_FIELDS.get(logical, logical)
                raise ConfigError(
                    f"model.{field}={dim} (logical axis {logical!r} of param "
                    f"{jax.tree_util.keystr(path)}) is not divisible by the {n} shards of mesh "
                    f"axes {shown(axes)}", where=f"mesh.logical_axis_rules.{logical}",
                    fix=f"choose mesh sizes whose product divides {dim}, or map {logical!r} to "
                        f"other mesh axes (an empty list replicates it)")
    return sizes


def batch_sharding(mesh: Mesh, rules) -> jax.sharding.NamedSharding:
    """Sharding of [batch, length] arrays: rows over the ``batch`` axes, columns over ``length``."""
    import flax.linen as nn

    return nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec("batch", "length"), mesh, rules)


def replicated(mesh: Mesh) -> jax.sharding.NamedSharding:
    """A sharding that keeps a full copy on every device of ``mesh``."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
