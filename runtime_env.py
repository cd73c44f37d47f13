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

On ``import cadenza`` (before JAX is imported, with ``JAX_PLATFORMS`` unset) the package
root applies the same platform choice, so library use is quiet too; the compilation
cache is set by the CLI only.
"""

import glob
import importlib.util
import os
import pathlib

GOOGLE_PCI_VENDOR = "0x1ae0"  # the PCI vendor id of TPU chips
COMPILE_CACHE_ENV = "CADENZA_COMPILE_CACHE"


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


def configure_cli(compile_cache: str | None = None, env=None) -> None:
    """Set the environment for a CLI command (call before JAX is imported): the platform
    list (:func:`default_platforms`) and the persistent compilation cache
    (:func:`compile_cache_dir`; entries for compiles over 0.5 s)."""
    env = os.environ if env is None else env
    platforms = default_platforms(env)
    if platforms is not None:
        env["JAX_PLATFORMS"] = platforms
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
