"""Preflight: check a host is ready to join a run, before any step is compiled.

Each worker of a pod runs :func:`check_host` (via ``cadenza preflight``) with
what the launcher expects: the code revision it shipped, the JAX version it
pins, the slice's device count and a minimum of free disk. A host that
differs fails with one message listing every mismatch, naming the host.
"""

import dataclasses
import pathlib
import shutil
import socket
import subprocess

from cadenza.errors import CadenzaError
from cadenza.train.topology import GIB

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent
REVISION_FILE = "REVISION"


def code_revision(root: pathlib.Path = PACKAGE_ROOT) -> str | None:
    """The revision of the cadenza code at ``root``: its ``REVISION`` file (written
    into launch archives), else ``git rev-parse HEAD`` there, else None."""
    marker = root / REVISION_FILE
    if marker.is_file():
        return marker.read_text().strip() or None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@dataclasses.dataclass(frozen=True)
class HostFacts:
    """What one host has: its name, process index, versions, devices and free disk."""

    host: str
    process_index: int
    jax_version: str
    revision: str | None
    devices: int
    local_devices: int
    platform: str
    free_bytes: int

    def summary(self) -> str:
        rev = (self.revision or "unknown")[:12]
        return (f"{self.host} (process {self.process_index}): jax {self.jax_version}, "
                f"{self.devices} {self.platform} devices ({self.local_devices} local), "
                f"revision {rev}, {self.free_bytes / GIB:.1f} GiB free")


def host_facts(disk_path: str = ".") -> HostFacts:
    """Gather :class:`HostFacts` for this process (initialises the JAX backend)."""
    import jax

    return HostFacts(host=socket.gethostname(), process_index=jax.process_index(),
                     jax_version=jax.__version__, revision=code_revision(),
                     devices=jax.device_count(), local_devices=jax.local_device_count(),
                     platform=jax.devices()[0].platform,
                     free_bytes=shutil.disk_usage(disk_path).free)


def mismatches(facts: HostFacts, *, revision: str | None = None, devices: int | None = None,
               jax_version: str | None = None, min_free_gib: float = 0.0) -> list[str]:
    """Every way ``facts`` differ from the expectations (None = not checked)."""
    problems = []
    if revision is not None and not (facts.revision and (
            facts.revision.startswith(revision) or revision.startswith(facts.revision))):
        problems.append(f"code revision is {facts.revision or 'unknown'}, expected {revision}")
    if devices is not None and facts.devices != devices:
        problems.append(f"sees {facts.devices} devices, expected {devices}")
    if jax_version is not None and facts.jax_version != jax_version:
        problems.append(f"has jax {facts.jax_version}, expected {jax_version}")
    if facts.free_bytes < min_free_gib * GIB:
        problems.append(f"has {facts.free_bytes / GIB:.1f} GiB free disk, needs "
                        f"{min_free_gib:g} GiB")
    return problems


def check_host(*, revision: str | None = None, devices: int | None = None,
               jax_version: str | None = None, min_free_gib: float = 0.0,
               disk_path: str = ".") -> HostFacts:
    """Check this host against the expectations; return its facts or raise CadenzaError
    naming the host and listing every mismatch."""
    facts = host_facts(disk_path)
    problems = mismatches(facts, revision=revision, devices=devices, jax_version=jax_version,
                          min_free_gib=min_free_gib)
    if problems:
        raise CadenzaError(f"preflight failed on {facts.host} (process {facts.process_index}): "
                           + "; ".join(problems), where="preflight",
                           fix="reinstall the same code and jax on every worker (cadenza "
                               "launch does this), use the slice the config was made for, or "
                               "free disk space")
    return facts
