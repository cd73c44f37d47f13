"""cadenza: JAX-native modeling, PEFT training and fast decoding for language models.

The package root stays light (nothing here imports JAX) so ``cadenza --help``
answers at once. Public entry points:

- ``cadenza.load_config(path, overrides=[...])`` -> :class:`cadenza.config.ExperimentConfig`
- ``cadenza.models``: the Flax model (``Transformer``, ``init_params``, ``KVCache``)
"""

__version__ = "0.1.0"

__all__ = ["load_config", "CadenzaError", "ConfigError", "__version__"]


def __getattr__(name):
    if name == "load_config":
        from cadenza.config import load_config

        return load_config
    if name in ("CadenzaError", "ConfigError"):
        from cadenza import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'cadenza' has no attribute {name!r}")
