"""Output directories that are never seen half-written, and one writer per run folder.

- :func:`atomic_dir`: build a directory under a temporary sibling name, mark it complete
  and rename it into place, so a reader sees either the old directory, none, or the whole
  new one, also after a SIGKILL, a full disk or a crash mid-write.
- :func:`is_complete` / :func:`require_complete`: the completeness marker that loaders
  check, so a directory left by an interrupted writer is refused with a clear error
  instead of being read.
- :class:`OutputLock`: a lock file per output directory naming the run that holds it
  (pid, host, start time); a lock left by a process that is gone (same host, pid no
  longer alive) is taken over, any other one is a clear error naming the other run.
- :func:`atomic_file`: the same temp-sibling-and-rename for single files.
- :func:`save_safetensors`: one safetensors file with ordinary permissions and I/O errors
  that :func:`disk_errors` understands.
"""

import contextlib
import datetime
import errno
import json
import os
import pathlib
import re
import shutil
import socket
import sys

from cadenza.errors import CadenzaError

MARKER = ".cadenza-complete"
LOCK = ".cadenza.lock"
_PARTIAL, _OLD = ".partial", ".old"


def _processes() -> tuple[int, int]:
    """(process index, process count) of a multi-host JAX run; (0, 1) without JAX."""
    jax = sys.modules.get("jax")
    if jax is None:
        return 0, 1
    return jax.process_index(), jax.process_count()


def _sync(name: str) -> None:
    """A barrier across the JAX processes (no-op for one process)."""
    if _processes()[1] > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"cadenza:{name}")


def is_complete(directory) -> bool:
    """True when ``directory`` was finished by :func:`atomic_dir` (it holds the marker)."""
    return (pathlib.Path(directory) / MARKER).is_file()


def require_complete(directory, what: str) -> None:
    """Raise a :class:`CadenzaError` unless ``directory`` (a ``what``, e.g. "model
    directory") holds the completeness marker."""
    d = pathlib.Path(directory)
    if not is_complete(d):
        raise CadenzaError(f"this {what} is incomplete: its writer was interrupted before it "
                           f"finished (no {MARKER} marker)", where=str(d),
                           fix="rerun the command that writes it (a training run re-exports "
                               "from its last checkpoint), or delete the folder")


def _partial_path(target: pathlib.Path) -> pathlib.Path:
    # One shared name across the processes of a multi-host run (they write one directory
    # together); a single process adds its pid so that concurrent writers never collide.
    index, count = _processes()
    tag = "" if count > 1 else f"-{socket.gethostname()}-{os.getpid()}"
    return target.with_name(f".{target.name}{_PARTIAL}{tag}")


def _remove_dead_partials(target: pathlib.Path) -> None:
    """Delete temp siblings of ``target`` (also nested ones, ``..name.partial-h-1.partial-
    h-1``) left by writers on this host that are gone."""
    host = socket.gethostname()
    for p in target.parent.glob(f".*{target.name}{_PARTIAL}-*"):
        writers = re.findall(rf"{re.escape(_PARTIAL)}-(.+?)-(\d+)(?=\.|$)", p.name)
        if any(h == host and not _alive(int(pid)) for h, pid in writers):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()


@contextlib.contextmanager
def atomic_dir(target, *, replace: bool = False):
    """Yield a temporary sibling path (not yet created) to write ``target``'s contents to;
    on a clean exit, write the completeness marker and rename it to ``target``.

    Multi-host: every process must enter (the name is shared); process 0 renames after a
    barrier. With ``replace=False`` an existing non-empty ``target`` is an error (it is
    someone's files, or an interrupted writer's: the message says which); with
    ``replace=True`` (a folder the caller owns, e.g. a run's ``model/``) it is replaced
    once the new one is complete. On an exception the temp folder is
    removed and ``target`` is left as it was. Errors from the disk (full, read-only,
    no permission) become a :class:`CadenzaError` naming the folder.
    """
    target = pathlib.Path(target).absolute()
    index, _ = _processes()
    if not replace and target.is_dir() and any(target.iterdir()):
        what = ("already exists" if is_complete(target) else
                "already exists and is not empty (an interrupted write, or other files)")
        raise CadenzaError(f"this output directory {what}", where=str(target),
                           fix="choose a new output directory or delete the old one")
    if not replace and target.exists() and not target.is_dir():
        raise CadenzaError("this output path is a file", where=str(target),
                           fix="choose a new output directory")
    tmp = _partial_path(target)
    if index == 0:
        with disk_errors(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            _remove_dead_partials(target)
            if tmp.exists():
                shutil.rmtree(tmp)
    _sync(f"atomic-start:{target.name}")
    try:
        with disk_errors(target):
            yield tmp
            _sync(f"atomic-written:{target.name}")
            if index == 0:
                tmp.mkdir(parents=True, exist_ok=True)
                stamp = {"written": datetime.datetime.now(datetime.timezone.utc).isoformat()}
                (tmp / MARKER).write_text(json.dumps(stamp) + "\n")
                _swap_in(tmp, target, replace)
    except BaseException:
        if index == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync(f"atomic-done:{target.name}")


def _swap_in(tmp: pathlib.Path, target: pathlib.Path, replace: bool) -> None:
    """Rename ``tmp`` to ``target``. With ``replace``, an existing ``target`` is moved
    aside first and deleted only after the new one is in place; without, only a missing
    or empty ``target`` is replaced (another writer that finished first wins)."""
    if not replace:
        try:
            os.replace(tmp, target)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            raise CadenzaError("another writer created this output directory while this "
                               "one was being written; it was left as it is", where=str(target),
                               fix="choose a new output directory") from None
        return
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}{_OLD}-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_file(target, *, overwrite: bool = False):
    """Yield a temporary sibling path to write the file ``target`` to; rename it into place
    on a clean exit (an existing ``target`` is an error unless ``overwrite``)."""
    target = pathlib.Path(target).absolute()
    if target.exists() and not overwrite:
        raise CadenzaError("this output file already exists", where=str(target),
                           fix="choose a new output path or delete the old file")
    tmp = target.with_name(f".{target.name}{_PARTIAL}-{os.getpid()}")
    try:
        with disk_errors(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


_DISK_ERRORS = {errno.ENOSPC: ("the disk is full", "free space or choose another folder"),
                errno.EDQUOT: ("the disk quota is exceeded", "free space or choose another "
                               "folder"),
                errno.EROFS: ("the file system is read-only", "choose a writable folder"),
                errno.EACCES: ("permission denied", "choose a folder you can write to"),
                errno.EPERM: ("operation not permitted", "choose a folder you can write to")}


@contextlib.contextmanager
def disk_errors(where):
    """Turn a full disk, a read-only file system or a permission error raised inside the
    block into a :class:`CadenzaError` naming ``where``; other errors pass through."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_ERRORS:
            raise
        what, fix = _DISK_ERRORS[e.errno]
        raise CadenzaError(f"{what} ({e.filename or where})", where=str(where), fix=fix) from e


def save_safetensors(path, arrays: dict, metadata: dict | None = None) -> None:
    """Write ``arrays`` ({name: NumPy array}) to the safetensors file ``path``.

    The safetensors library writes owner-only files (mode 0600) and reports I/O failures as
    text; this gives the file the mode of any new file (0666 less the umask) and raises
    those failures as :class:`OSError` with their errno (so :func:`disk_errors` names them).
    """
    import safetensors
    import safetensors.numpy

    try:
        safetensors.numpy.save_file(arrays, str(path), metadata=metadata)
    except safetensors.SafetensorError as e:  # its I/O errors carry the OS error only as text
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from e
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """The lock of one output directory, held for a ``with`` block (process 0 only).

    The lock file ``<directory>/.cadenza.lock`` holds ``{"pid", "host", "started",
    "command"}``. Raises :class:`CadenzaError` naming the other run when one holds it;
    a lock of a dead process on this host is replaced (``stale`` holds its content).
    """

    def __init__(self, directory):
        self.directory = pathlib.Path(directory).absolute()
        self.path = self.directory / LOCK
        self.stale: dict | None = None
        self._held = False

    def __enter__(self):
        if _processes()[0] != 0:
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "command": " ".join(sys.argv)}
        with disk_errors(self.directory):
            self.directory.mkdir(parents=True, exist_ok=True)
            for _ in range(2):
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    other = self._read()
                    if other is not None and self._is_stale(other):
                        self.stale = other
                        self.path.unlink(missing_ok=True)
                        continue
                    raise self._busy(other) from None
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(me) + "\n")
                self._held = True
                return self
        raise self._busy(self._read())

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # being written right now, or unreadable: treat as held

    @staticmethod
    def _is_stale(other: dict) -> bool:
        return (other.get("host") == socket.gethostname() and isinstance(other.get("pid"), int)
                and not _alive(other["pid"]))

    def _busy(self, other: dict | None) -> CadenzaError:
        who = ("another run" if other is None else
               f"another run (pid {other.get('pid')} on host {other.get('host')}, started "
               f"{other.get('started')}: {other.get('command')})")
        return CadenzaError(f"{who} is writing to this output directory", where=str(self.directory),
                            fix=f"wait for it to finish or use another output directory; if "
                                f"that run is gone (e.g. on another host), delete {self.path}")

    def __exit__(self, *exc):
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False
