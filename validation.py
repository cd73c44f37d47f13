"""Field checks shared by the config dataclasses.

Each raises :class:`cadenza.errors.ConfigError` naming the field, the value
and what is allowed. They are called from ``__post_init__`` so a config
object can never exist with an invalid value.
"""

from collections.abc import Iterable

from cadenza.errors import ConfigError


def check_choice(section: str, field: str, value, allowed: Iterable) -> None:
    """Fail unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(
            f"invalid value {value!r}",
            where=f"{section}.{field}",
            fix=f"use one of: {', '.join(repr(a) for a in allowed)}",
        )


def check_range(section: str, field: str, value, *, low=None, high=None,
                low_inclusive: bool = True, high_inclusive: bool = True,
                optional: bool = False) -> None:
    """Fail unless ``low <= value <= high`` (bounds optional, inclusivity configurable)."""
    if value is None and optional:
        return
    ok = value is not None
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        lo = "" if low is None else f"{low} {'<=' if low_inclusive else '<'} "
        hi = "" if high is None else f" {'<=' if high_inclusive else '<'} {high}"
        raise ConfigError(
            f"value {value!r} is out of range",
            where=f"{section}.{field}",
            fix=f"allowed: {lo}{field}{hi}",
        )


def require(condition: bool, where: str, what: str, fix: str) -> None:
    """Fail with ``what``/``fix`` at ``where`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(what, where=where, fix=fix)
