"""Lazy package exports: package ``__init__`` modules name what they export
without importing it, so that reading configs or the CLI's help does not
import JAX."""

import importlib


def lazy_getattr(package: str, exports: dict[str, str]):
    """Return a module ``__getattr__`` resolving ``exports`` (name -> defining module)
    on first access; unknown names raise ``AttributeError`` naming ``package``."""

    def __getattr__(name):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


class LazyModule:
    """A stand-in for the module ``name`` that imports it on first attribute access, for
    modules only some platforms use (e.g. the GPU kernels: importing Mosaic GPU costs
    seconds that a CPU or TPU run does not need to pay)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)
