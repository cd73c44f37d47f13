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
