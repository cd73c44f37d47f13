"""Remote locations (``gs://``, ``s3://``, any file system etils.epath / fsspec knows) for
model inputs and run outputs.

cadenza reads and writes model directories and checkpoints through local paths
(orbax, tensorstore, atomic renames, file locks). A URL is bridged by a local copy:

- **Inputs** (``train.init_from``, ``--checkpoint``, ``--draft``, any model directory or
  Hugging Face folder): :func:`local_model_dir` downloads the remote folder once into
  ``~/.cache/cadenza/remote/<hash>`` (``$CADENZA_REMOTE_CACHE`` or ``$XDG_CACHE_HOME``
  honoured) and reuses that copy while the remote listing (names and sizes) is unchanged.
  A folder that is still being written (a cadenza directory without its completeness
  marker) is refused before anything is copied.
- **Outputs** (``train.output_dir``): :class:`RunMirror` keeps the run in a local folder
  of the same cache, pulls what the remote already holds before training (so runs
  resume), and pushes new and changed files after every checkpoint and at the end.
  Completeness markers are uploaded last, temporary folders (orbax's in-progress saves,
  cadenza's ``.partial`` writes) never, and files the run deleted locally (rotated-out
  checkpoints) are deleted remotely. A run killed mid-upload therefore leaves a remote
  folder whose unfinished parts carry no marker, which every reader refuses or skips.

One writer per remote output folder: the lock that guards a local output folder
(:class:`cadenza.outputs.OutputLock`) is taken on the local mirror only.
"""

import hashlib
import json
import os
import pathlib
import shutil

from cadenza.errors import CadenzaError
from cadenza.outputs import MARKER, atomic_dir

# path parts of temporary folders never uploaded or downloaded
_TEMPORARY = (".partial", ".old", "orbax-checkpoint-tmp", ".lock")
_MANIFEST = ".cadenza-remote.json"


def is_remote(path) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) other than ``file://``."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def as_path(path):
    """``path`` as a path object: local paths (``file://`` URLs included) as
    :class:`pathlib.Path`, other URLs such as ``gs://bucket/data`` (``gs``, ``s3``, ``az``,
    ``hf``) as ``etils.epath`` paths (fsspec file systems: gcsfs for ``gs://``, ...)."""
    text = str(path)
    if text.startswith("file://"):
        return pathlib.Path(text[len("file://"):])
    if "://" in text:
        from etils import epath

        return epath.Path(text)
    return pathlib.Path(text).expanduser()


def cache_root(env=None) -> pathlib.Path:
    """Where local copies of remote folders live: ``$CADENZA_REMOTE_CACHE``, else
    ``$XDG_CACHE_HOME/cadenza/remote``, else ``~/.cache/cadenza/remote``."""
    env = os.environ if env is None else env
    if env.get("CADENZA_REMOTE_CACHE"):
        return pathlib.Path(env["CADENZA_REMOTE_CACHE"]).expanduser()
    base = pathlib.Path(env.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    return base / "cadenza" / "remote"


def _slot(url: str, kind: str) -> pathlib.Path:
    name = url.rstrip("/").rsplit("/", 1)[-1] or "root"
    return cache_root() / kind / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def _temporary(relative: str) -> bool:
    return any(t in part for part in relative.split("/") for t in _TEMPORARY)


def _listing(root) -> dict[str, int]:
    """{relative path: size} of every file below ``root`` (local or remote), temporary
    folders left out."""
    out: dict[str, int] = {}
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        for child in folder.iterdir():
            rel = f"{prefix}{child.name}"
            if _temporary(rel) or rel == _MANIFEST:
                continue
            if child.is_dir():
                stack.append((child, rel + "/"))
            else:
                st = child.stat()
                out[rel] = st.length if hasattr(st, "length") else st.st_size
    return out


def _copy(src, dst) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as fin, dst.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def _marker_last(names) -> list[str]:
    """``names`` in upload order: ordinary files, then orbax's commit files, then
    cadenza's completeness markers (a copy cut short is never taken for complete)."""
    def rank(name: str) -> int:
        base = name.rsplit("/", 1)[-1]
        return {MARKER: 2, "commit_success.txt": 1}.get(base, 0)

    return sorted(names, key=lambda n: (rank(n), n))


def local_model_dir(path) -> pathlib.Path:
    """A local path for the model directory or Hugging Face folder ``path``: local paths
    unchanged; a URL downloaded into the remote cache (reused while the remote files'
    names and sizes are unchanged).

    Raises:
      CadenzaError: the URL is not a folder, is empty, or is a cadenza model directory
        still being written (``config.yaml`` without its completeness marker).
    """
    if not is_remote(path):
        return as_path(path)
    url = str(path).rstrip("/")
    remote = as_path(url)
    try:
        if not remote.is_dir():
            raise CadenzaError("no such remote model directory", where=url,
                               fix="check the URL (a cadenza model directory or a Hugging "
                                   "Face folder) and the credentials of its file system")
        listing = _listing(remote)
    except CadenzaError:
        raise
    except Exception as e:  # credentials, network, missing fsspec backend
        raise CadenzaError(f"cannot list the remote folder ({type(e).__name__}: {e})",
                           where=url, fix="check the URL, the credentials and that the "
                           "file system's fsspec package (e.g. gcsfs) is installed") from e
    if not listing:
        raise CadenzaError("the remote folder is empty", where=url,
                           fix="point at a model directory or a Hugging Face folder")
    if "config.yaml" in listing and MARKER not in listing \
            and "params/commit_success.txt" not in listing:
        raise CadenzaError("the remote model directory is incomplete (no completeness "
                           "marker: still being written, or its writer was killed)",
                           where=url, fix="wait for the run to finish, or rerun its export")
    local = _slot(url, "models")
    manifest = local / _MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()) == listing:
        return local
    with atomic_dir(local, replace=True) as tmp:
        for rel in _marker_last(listing):
            _copy(remote / rel, tmp / rel)
        (tmp / _MANIFEST).write_text(json.dumps(listing, sort_keys=True))
    return local


class RunMirror:
    """A local working copy of the remote run folder ``url`` (see the module docstring).

    ``local``: the folder the run writes to. :meth:`push` uploads new and changed files
    (markers last), then the manifest (``.cadenza-remote.json``: every file the remote
    holds complete, with its size), then deletes remote files the run has deleted.
    :meth:`pull` downloads what the manifest lists (files of a push that was killed are
    not listed, so they are never taken for complete).
    """

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self.remote = as_path(self.url)
        self.local = _slot(self.url, "runs")
        self._pushed: dict[str, tuple[int, int]] = {}

    def _remote_manifest(self) -> dict[str, int]:
        try:
            if not self.remote.is_dir():
                return {}
            path = self.remote / _MANIFEST
            return json.loads(path.read_text()) if path.exists() else _listing(self.remote)
        except Exception as e:  # credentials, network, missing fsspec backend
            raise CadenzaError(f"cannot read the remote output folder ({type(e).__name__}: "
                               f"{e})", where=self.url, fix="check the URL, the credentials "
                               "and that the file system's fsspec package is installed") from e

    def pull(self) -> int:
        """Make the local folder equal to the remote one (files missing or different here
        are downloaded, files the remote lacks are removed); returns how many were
        downloaded."""
        listing = self._remote_manifest()
        self.local.mkdir(parents=True, exist_ok=True)
        here = _listing(self.local)
        fetched = 0
        for rel in _marker_last(listing):
            if here.get(rel) != listing[rel]:
                _copy(self.remote / rel, self.local / rel)
                fetched += 1
            st = (self.local / rel).stat()
            self._pushed[rel] = (st.st_size, st.st_mtime_ns)
        for rel in set(here) - set(listing):  # left over from an older mirror of this URL
            (self.local / rel).unlink()
        return fetched

    def push(self) -> int:
        """Upload new and changed files (markers last) and the manifest, then delete remote
        files that were uploaded before and are gone here; returns how many files were
        uploaded."""
        current = {}
        for rel in _listing(self.local):
            st = (self.local / rel).stat()
            current[rel] = (st.st_size, st.st_mtime_ns)
        changed = [rel for rel, sig in current.items() if self._pushed.get(rel) != sig]
        for rel in _marker_last(changed):
            _copy(self.local / rel, self.remote / rel)
            self._pushed[rel] = current[rel]
        gone = set(self._pushed) - set(current)
        if changed or gone:
            (self.remote / _MANIFEST).write_text(
                json.dumps({rel: sig[0] for rel, sig in current.items()}, sort_keys=True))
        for rel in gone:
            target = self.remote / rel
            if target.exists():
                target.unlink()
            del self._pushed[rel]
        return len(changed)
