"""Where a measured result came from: device, software versions, commit and date.

Every benchmark and the quickstart stamp their results with :func:`provenance` and
write them under :func:`results_dir` (``bench/results/<device_label()>``)."""

import datetime
import os
import pathlib
import platform
import subprocess


def device_label() -> str:
    """``cpu`` on CPU, else the device kind in lower case with dashes (``nvidia-h100``)."""
    import jax

    dev = jax.devices()[0]
    return dev.platform if dev.platform == "cpu" else dev.device_kind.replace(" ", "-").lower()


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """Short hash of HEAD for the repository at ``cwd`` (or ``GIT_DIR``); None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=cwd, check=False).stdout.strip()
    except OSError:
        return None
    return out or None


def provenance(cwd: str | os.PathLike | None = None) -> dict:
    """device (platform), device_kind, num_devices, host, cpu_count, load_avg_1m, jax,
    python, commit, date (UTC, ISO seconds): the stamp every result file carries.

    ``commit`` is ``$CADENZA_COMMIT`` when set (scripts/gpu_check.sh sets it: a copied
    working tree may have no git history), else :func:`git_commit`."""
    import jax

    dev = jax.devices()[0]
    return {"device": dev.platform, "device_kind": dev.device_kind,
            "num_devices": jax.device_count(), "host": platform.machine(),
            "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
            "jax": jax.__version__, "python": platform.python_version(),
            "commit": os.environ.get("CADENZA_COMMIT") or git_commit(cwd),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def results_dir(script: str | os.PathLike, out: str | os.PathLike | None = None) -> pathlib.Path:
    """``out`` if given, else ``<script's folder>/results/<device_label()>``; created."""
    path = pathlib.Path(out) if out else (pathlib.Path(script).resolve().parent / "results"
                                          / device_label())
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_note(meta: dict) -> str:
    """``load S at the start, E at the end`` for a results header, from a
    :func:`provenance` dict taken at the end plus ``load_avg_1m_start`` (1-minute load
    averages of the whole machine: they include the benchmark's own work)."""
    return (f"load {meta['load_avg_1m_start']:.1f} at the start, {meta['load_avg_1m']:.1f} at "
            "the end (1-minute load averages, the benchmark's own work included)")
