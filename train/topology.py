"""Cloud TPU slice names (``v5p-32``, ``v5e-16``, ``v5e:4x4``) and their shapes.

A :class:`TpuSlice` says what ``jax.experimental.topologies.get_topology_desc``
needs to build the slice's abstract devices on any machine with the ``tpu``
extra (libtpu) installed, how many hosts (TPU VM workers) it has, and each
chip's HBM. Accelerator-type names follow Cloud TPU: the number after
``v4-`` / ``v5p-`` counts TensorCores (two per chip, one JAX device per chip
in megacore mode); after ``v5e-`` / ``v6e-`` it counts chips.
"""

import dataclasses
import math
import os

from cadenza.errors import CadenzaError
from cadenza.runtime_env import quiet_libtpu_for_aot

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class ChipKind:
    """One TPU generation: its topology prefix, HBM per chip and host layout."""

    prefix: str  # as in get_topology_desc's topology string, e.g. "v5p"
    hbm_gib: float
    cores_per_chip: int  # TensorCores counted by the accelerator-type name
    dims: int  # 3 for the 3D-torus chips (v4, v5p), 2 for v5e / v6e
    chip_config_name: str | None  # "megacore": one JAX device per chip
    host_bounds: tuple[int, int, int]  # chips per host in multi-host slices


CHIPS = {
    "v4": ChipKind("v4", 32.0, 2, 3, "megacore", (2, 2, 1)),
    "v5p": ChipKind("v5p", 95.0, 2, 3, "megacore", (2, 2, 1)),
    "v5e": ChipKind("v5e", 16.0, 1, 2, None, (2, 2, 1)),
    "v6e": ChipKind("v6e", 32.0, 1, 2, None, (2, 2, 1)),
}

# Chip-grid shapes of the slice sizes Cloud TPU sells, keyed by chip count.
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A TPU slice: chip kind and chip grid (``shape``), e.g. v5p with (2, 2, 4)."""

    chip: ChipKind
    shape: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def name(self) -> str:
        """The Cloud TPU accelerator type, e.g. ``v5p-32``."""
        return f"{self.chip.prefix}-{self.chips * self.chip.cores_per_chip}"

    @property
    def topology(self) -> str:
        """The topology string for ``get_topology_desc``, e.g. ``v5p:2x2x4``."""
        return f"{self.chip.prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host(self) -> tuple[int, int, int]:
        """Host bounds: single-host slices (<= 8 chips on 2D chips) keep all chips on one host."""
        grid = tuple(self.shape) + (1,) * (3 - len(self.shape))
        if self.chip.dims == 2 and self.chips <= 8:
            return grid
        return tuple(min(g, b) for g, b in zip(grid, self.chip.host_bounds))

    @property
    def hosts(self) -> int:
        """Number of TPU VM workers (processes) in the slice."""
        return self.chips // math.prod(self.chips_per_host)

    @property
    def hbm_bytes(self) -> int:
        return int(self.chip.hbm_gib * GIB)

    def devices(self):
        """The slice's abstract JAX devices (needs the ``tpu`` extra: libtpu).

        Sets ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` (unless set): compiling touches no
        TPU, so concurrent compiles need not take libtpu's one-process lock file.
        """
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        quiet_libtpu_for_aot(self.name)
        try:
            from jax.experimental import topologies
        except ImportError as e:  # pragma: no cover - jax always ships it
            raise CadenzaError("jax.experimental.topologies is unavailable") from e
        kwargs = {"chip_config_name": self.chip.chip_config_name} if self.chip.chip_config_name \
            else {}
        try:
            desc = topologies.get_topology_desc(
                platform="tpu", topology_name=self.topology,
                chips_per_host_bounds=self.chips_per_host, num_slices=1, **kwargs)
        except Exception as e:  # libtpu missing or refusing the shape
            raise CadenzaError(
                f"cannot build TPU topology {self.topology}: {e}",
                fix="install the tpu extra (uv sync --frozen --extra tpu, or "
                    "pip install 'cadenza[tpu]') to compile for TPUs") from e
        return desc.devices


def known_slice_names() -> list[str]:
    """Every accelerator-type name :func:`parse_slice` accepts (``v5p-8`` ...)."""
    names = []
    for chip in CHIPS.values():
        shapes = SHAPES_3D if chip.dims == 3 else SHAPES_2D
        names += [TpuSlice(chip, s).name for s in shapes.values()]
    return names


def parse_slice(name: str, where: str = "--topology") -> TpuSlice:
    """A :class:`TpuSlice` from ``v5p-32`` (accelerator type), ``v5e:4x4`` (topology)
    or ``v5litepod-16``. Unknown names raise :class:`CadenzaError` listing the known ones."""
    text = name.strip().lower().replace("v5litepod", "v5e").replace("v5lite", "v5e")
    known = ", ".join(known_slice_names())
    fix = f"use an accelerator type ({known}) or a topology such as v5e:2x2 or v5p:2x2x4"
    prefix, sep, rest = text.partition(":") if ":" in text else text.partition("-")
    chip = CHIPS.get(prefix)
    if chip is None or not sep or not rest:
        raise CadenzaError(f"unknown TPU slice {name!r}", where=where, fix=fix)
    if sep == ":":
        try:
            shape = tuple(int(x) for x in rest.split("x"))
        except ValueError:
            raise CadenzaError(f"bad topology {name!r}", where=where, fix=fix) from None
        if len(shape) != chip.dims or min(shape) < 1:
            raise CadenzaError(f"topology {name!r} needs {chip.dims} positive dimensions "
                               f"for {chip.prefix}", where=where, fix=fix)
        return TpuSlice(chip, shape)
    shapes = SHAPES_3D if chip.dims == 3 else SHAPES_2D
    try:
        cores = int(rest)
    except ValueError:
        raise CadenzaError(f"unknown TPU slice {name!r}", where=where, fix=fix) from None
    chips, remainder = divmod(cores, chip.cores_per_chip)
    if remainder or chips not in shapes:
        raise CadenzaError(f"unknown TPU slice {name!r}", where=where, fix=fix)
    return TpuSlice(chip, shapes[chips])
