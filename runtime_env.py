"""Process set-up for the ``cadenza`` command line, done before JAX is imported.

- Platforms: on a machine without TPU chips, an installed libtpu (the ``tpu``
  extra) would still initialise and print warnings about missing TPU metadata.
  Unless ``JAX_PLATFORMS`` is set, the CLI lists the platforms this machine has
  (``cuda`` when an NVIDIA GPU and JAX's CUDA plugin are present, then ``cpu``), so
  libtpu is only loaded on purpose: by ``cadenza compile``, which compiles for
  TPU topologies without a TPU (see :func:`quiet_libtpu_for_aot`).
- Compilation cache: JAX's persistent compilation cache is on by default in
  ``~/.cache/cadenza/jax-compile`` (``$XDG_CACHE_HOME`` honoured). Choose another
  folder with ``--compile-cache DIR`` or ``CADENZA_COMPILE_CACHE=DIR``; turn it off
  with ``off``. A ``JAX_COMPILATION_CACHE_DIR`` set by the user wins.
- Host memory (CPU-only machines): XLA's CPU runtime allocates each compiled call's
  temporary buffer afresh (hundreds of MiB for a train step) and glibc returns it to the
  system when it is freed, so every step faults the pages in again (about 15% of a 10m
  train step's CPU time here). With ``--host-memory keep`` (the default when no TPU chips
  and no usable NVIDIA GPU are visible; ``CADENZA_HOST_MEMORY``) the CLI tells glibc's
  malloc to keep large freed blocks mapped and reuse them (:func:`keep_host_memory`); the
  cost is a higher resident size (about twice the peak of one step's buffers).
  ``release`` leaves malloc as it is.

On ``import cadenza`` (before JAX is imported, with ``JAX_PLATFORMS`` unset) the package
root applies the same platform choice, so library use is quiet too; the compilation
cache is set by the CLI only.
"""

import ctypes
import glob
import importlib.util
import os
import pathlib

from cadenza.errors import CadenzaError

GOOGLE_PCI_VENDOR = "0x1ae0"  # the PCI vendor id of TPU chips
COMPILE_CACHE_ENV = "CADENZA_COMPILE_CACHE"
HOST_MEMORY_ENV = "CADENZA_HOST_MEMORY"
HOST_MEMORY_CHOICES = ("auto", "keep", "release")
# glibc malloc settings that keep freed memory mapped: one arena, large blocks from the heap
# (no mmap), the heap never trimmed, as (tunable name, mallopt parameter of malloc.h, value)
_KEPT_MALLOC = (("arena_max", -8, 1), ("mmap_max", -4, 0), ("trim_threshold", -1, 2**31 - 1))


def tpu_chips_visible() -> bool:
    """Whether this machine exposes TPU chips (PCI vendor Google, or /dev/accel*)."""
    if glob.glob("/dev/accel*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if pathlib.Path(vendor).read_text().strip() == GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def _nvidia_gpu_usable() -> bool:
    """An NVIDIA GPU is visible and JAX's CUDA plugin is installed."""
    has_gpu = bool(glob.glob("/dev/nvidia[0-9]*"))
    plugin = any(importlib.util.find_spec(m) is not None
                 for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    return has_gpu and plugin


def default_platforms(env=None) -> str | None:
    """The ``JAX_PLATFORMS`` value the CLI sets, or None to leave JAX's choice.

    None when ``JAX_PLATFORMS`` is already set, when TPU chips are visible, or
    when libtpu is not installed (then nothing would print); otherwise ``cpu``,
    preceded by ``cuda`` when an NVIDIA GPU is usable.
    """
    env = os.environ if env is None else env
    if env.get("JAX_PLATFORMS") is not None or tpu_chips_visible():
        return None
    if importlib.util.find_spec("libtpu") is None:
        return None
    return "cuda,cpu" if _nvidia_gpu_usable() else "cpu"


def compile_cache_dir(flag: str | None = None, env=None) -> str | None:
    """The persistent compilation cache folder: ``flag`` (``--compile-cache``), else
    ``$CADENZA_COMPILE_CACHE``, else ``~/.cache/cadenza/jax-compile``; None for ``off``."""
    env = os.environ if env is None else env
    choice = flag if flag is not None else env.get(COMPILE_CACHE_ENV)
    if choice is not None and choice.strip().lower() in ("off", "none", "0", ""):
        return None
    if choice:
        return str(pathlib.Path(choice).expanduser())
    base = pathlib.Path(env.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    return str(base / "cadenza" / "jax-compile")


def host_memory_kept(flag: str | None = None, env=None) -> bool:
    """Whether the CLI keeps freed host memory mapped: ``flag`` (``--host-memory``), else
    ``$CADENZA_HOST_MEMORY``, else ``auto``: keep on a CPU-only machine (no TPU chips, no
    usable NVIDIA GPU) unless ``JAX_PLATFORMS`` names another platform."""
    env = os.environ if env is None else env
    choice = (flag if flag is not None else env.get(HOST_MEMORY_ENV) or "auto").strip().lower()
    if choice not in HOST_MEMORY_CHOICES:
        raise CadenzaError(f"host memory choice {choice!r} (--host-memory or "
                           f"${HOST_MEMORY_ENV}) is not one of {', '.join(HOST_MEMORY_CHOICES)}",
                           fix="pick one of those")
    if choice != "auto":
        return choice == "keep"
    platforms = env.get("JAX_PLATFORMS")
    if platforms:
        return platforms.strip().lower() == "cpu"
    return not tpu_chips_visible() and not _nvidia_gpu_usable()


def keep_host_memory() -> bool:
    """Make glibc's malloc keep freed blocks mapped and reuse them: large blocks come from
    the heap instead of fresh mappings (``M_MMAP_MAX`` 0), the heap is never trimmed, and
    one arena serves every thread, so XLA:CPU's per-call temporary buffers stop faulting
    their pages in on every call. Call it before JAX is imported (before its threads
    exist). Returns False where malloc is not glibc's (nothing changes then)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for _, param, value in _KEPT_MALLOC)


def keep_host_memory_tunables() -> str:
    """:func:`keep_host_memory`'s settings as a ``GLIBC_TUNABLES`` value, for a child
    process (glibc reads it at start-up)."""
    return ":".join(f"glibc.malloc.{name}={value}" for name, _, value in _KEPT_MALLOC)


def configure_cli(compile_cache: str | None = None, env=None,
                  host_memory: str | None = None) -> None:
    """Set the environment for a CLI command (call before JAX is imported): the platform
    list (:func:`default_platforms`), the persistent compilation cache
    (:func:`compile_cache_dir`; entries for compiles over 0.5 s) and, where
    :func:`host_memory_kept` says so for ``host_memory`` (``--host-memory``; None: the
    environment's choice or ``auto``), :func:`keep_host_memory`."""
    env = os.environ if env is None else env
    platforms = default_platforms(env)
    if platforms is not None:
        env["JAX_PLATFORMS"] = platforms
    if host_memory_kept(host_memory, env):
        keep_host_memory()
    cache = compile_cache_dir(compile_cache, env)
    if cache is not None and "JAX_COMPILATION_CACHE_DIR" not in env:
        env["JAX_COMPILATION_CACHE_DIR"] = cache
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def quiet_libtpu_for_aot(accelerator_type: str, env=None) -> None:
    """Before libtpu loads to compile for a TPU topology on a machine without TPUs: give
    it the single-host metadata it would otherwise query and warn about (set only where
    unset; nothing is done when TPU chips are visible)."""
    env = os.environ if env is None else env
    if tpu_chips_visible():
        return
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", accelerator_type),
                       ("TPU_WORKER_ID", "0"), ("TPU_WORKER_HOSTNAMES", "localhost")):
        env.setdefault(key, value)
