"""The one attention entry point the model calls.

``attention`` picks an implementation per backend and case. Today only the
plain-XLA reference exists (``implementation="xla"``); the Pallas kernels
dispatch from here when they land, and fall back to XLA for shapes they
cannot take.
"""

from cadenza.errors import ConfigError
from cadenza.pallas_kernels.attention_reference import reference_attention

IMPLEMENTATIONS = {"xla": reference_attention}


def attention(q, k, v, *, implementation: str = "xla", **kwargs):
    """Attention of new tokens over an optional cache prefix plus themselves.

    Shapes and masking rules: see
    :func:`cadenza.pallas_kernels.attention_reference.reference_attention`.
    """
    try:
        impl = IMPLEMENTATIONS[implementation]
    except KeyError:
        raise ConfigError(f"unknown attention implementation {implementation!r}",
                          where="model.attention_impl",
                          fix=f"use one of {sorted(IMPLEMENTATIONS)}") from None
    return impl(q, k, v, **kwargs)
