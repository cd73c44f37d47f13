"""cadenza: JAX-native modeling, PEFT training and fast decoding for language models.

The package root stays light (nothing here imports JAX) so ``cadenza --help``
answers at once. Public entry points:

- ``cadenza.load_config(path, overrides=[...])`` -> :class:`cadenza.config.ExperimentConfig`
- ``cadenza.models``: the Flax model (``Transformer``, ``init_params``, ``KVCache``)
"""

__version__ = "0.1.0"


def _quiet_platforms() -> None:
    """Importing cadenza before JAX on a machine without TPU chips but with libtpu installed
    (the ``tpu`` extra) keeps libtpu from initialising and printing warnings: the same
    ``JAX_PLATFORMS`` choice as the CLI (:func:`cadenza.runtime_env.default_platforms`),
    only when it is unset and JAX is not imported yet."""
    import os
    import sys

    if "jax" in sys.modules or os.environ.get("JAX_PLATFORMS") is not None:
        return
    from cadenza.runtime_env import default_platforms

    platforms = default_platforms()
    if platforms:
        os.environ["JAX_PLATFORMS"] = platforms


_quiet_platforms()

__all__ = ["load_config", "CadenzaError", "ConfigError", "__version__"]


def __getattr__(name):
    if name == "load_config":
        from cadenza.config import load_config

        return load_config
    if name in ("CadenzaError", "ConfigError"):
        from cadenza import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'cadenza' has no attribute {name!r}")
