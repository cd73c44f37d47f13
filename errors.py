"""cadenza's user-facing exception types.

A :class:`CadenzaError` is a mistake the user can fix (a config value, a data
file, a checkpoint, a command-line flag). Its message says what went wrong,
where, and how to fix it; the CLI prints it on one line and exits with 2.
Anything else that escapes is a bug in cadenza and keeps its traceback.
"""


class CadenzaError(Exception):
    """A user error: ``what`` went wrong, ``where`` and how to ``fix`` it."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        parts = [f"{where}: {what}" if where else what]
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__(" ".join(parts))


class ConfigError(CadenzaError):
    """An invalid config file, field, value or command-line override."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """``"Type: message"`` of ``e`` on one line, cut at ``limit`` characters (library
    errors, e.g. orbax/tensorstore ones, span many lines) for a CadenzaError message."""
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:limit]}" + ("..." if len(text) > limit else "")
