"""``cadenza launch tpu``: the gcloud commands that run an experiment on a TPU slice.

The plan, in order (each step stops the launch if it fails):

1. ``--create`` only: create the TPU VM slice.
2. Pack the code locally: ``git archive`` of the current commit (uncommitted
   changes to tracked files included via ``git stash create``) plus a
   ``REVISION`` file and the experiment file, into one tarball.
3. Copy it to every worker, unpack into ``~/cadenza/code/<revision>`` (that folder
   alone is replaced) and install the locked environment with the ``tpu`` extra
   (``uv sync --frozen --extra tpu``).
4. Preflight on every worker (``cadenza preflight``): same revision, same JAX
   version as here, the slice's device count, free disk; the roll call in
   ``cadenza.train.distributed`` names hosts that never join.
5. Start ``cadenza train`` on every worker from ``~/cadenza/runs`` (detached,
   logging to ``~/cadenza-train.log``) and follow worker 0's log until the run ends.

Code and outputs live in separate folders: a relative ``train.output_dir`` lands in
``~/cadenza/runs``, which no launch deletes, so relaunching (new code or the same)
resumes from the checkpoints there.
"""

import dataclasses
import importlib.metadata
import io
import pathlib
import shlex
import subprocess
import tarfile
import tempfile

from cadenza.errors import CadenzaError
from cadenza.train.preflight import PACKAGE_ROOT, REVISION_FILE
from cadenza.train.topology import TpuSlice

UV_VERSION = "0.13.9"
# relative to the workers' home folder, where gcloud's ssh commands start
CODE_ROOT = "cadenza/code"  # one folder per shipped revision
RUNS_DIR = "cadenza/runs"  # the working directory of training: outputs, never deleted
REMOTE_LOG = "~/cadenza-train.log"
REMOTE_PID = "~/cadenza-train.pid"
# TPU VM software versions per chip generation (override with --version).
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5",
                    "v5e": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}


@dataclasses.dataclass(frozen=True)
class TpuLaunch:
    """Everything ``cadenza launch tpu`` needs. ``experiment`` is a shipped
    experiment name or a local YAML file (shipped to the workers)."""

    name: str
    zone: str
    slice: TpuSlice
    experiment: str
    overrides: tuple[str, ...] = ()
    project: str | None = None
    create: bool = False
    spot: bool = False
    runtime_version: str | None = None
    min_free_gib: float = 20.0


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the plan: what it does and its argv (None = done here in Python)."""

    what: str
    argv: tuple[str, ...] | None

    def render(self) -> str:
        return f"# {self.what}\n" + (shlex.join(self.argv) if self.argv else "# (local)")


def _gcloud(launch: TpuLaunch, verb: str, *args: str) -> tuple[str, ...]:
    base = ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={launch.zone}"]
    if launch.project:
        base.append(f"--project={launch.project}")
    return tuple(base)


def _remote_experiment(launch: TpuLaunch, code: str) -> str:
    """The experiment argument as the workers see it (a shipped file lands in the
    ``run/`` folder of the code folder ``code``)."""
    path = pathlib.Path(launch.experiment)
    return f"{code}run/{path.name}" if path.is_file() else launch.experiment


def plan(launch: TpuLaunch, revision: str, archive: str, jax_version: str) -> list[Step]:
    """The launch steps for ``launch`` shipping code ``revision`` packed at ``archive``."""
    s = launch.slice
    steps = []
    if launch.create:
        version = launch.runtime_version or RUNTIME_VERSIONS[s.chip.prefix]
        create = [launch.name, f"--accelerator-type={s.name}", f"--version={version}"]
        if launch.spot:
            create.append("--spot")
        steps.append(Step(f"create the {s.name} slice ({s.hosts} workers)",
                          _gcloud(launch, "create", *create)))
    remote_tar = f"~/cadenza-{revision[:12]}.tar.gz"
    steps.append(Step(f"pack revision {revision} into {archive}", None))
    steps.append(Step("copy the code to every worker", _gcloud(
        launch, "scp", archive, f"{launch.name}:{remote_tar}", "--worker=all")))
    code = f"{CODE_ROOT}/{revision[:12]}"
    install = (f"set -e; rm -rf {code}; mkdir -p {code} {RUNS_DIR}; "
               f"tar -xzf {remote_tar} -C {code}; cd {code}; "
               f"python3 -m pip install --user --quiet uv=={UV_VERSION}; "
               "~/.local/bin/uv sync --frozen --extra tpu --managed-python --python 3.12")
    steps.append(Step("unpack and install the locked environment (tpu extra) on every worker",
                      _gcloud(launch, "ssh", launch.name, "--worker=all",
                              f"--command={install}")))
    preflight = shlex.join([".venv/bin/cadenza", "preflight", "--expect-revision", revision,
                            "--expect-devices", str(s.chips), "--expect-jax", jax_version,
                            "--min-free-gib", f"{launch.min_free_gib:g}"])
    steps.append(Step("preflight on every worker: revision, jax version, devices, free disk",
                      _gcloud(launch, "ssh", launch.name, "--worker=all",
                              f"--command=cd {code} && {preflight}")))
    up = "../" * len(RUNS_DIR.split("/"))  # from RUNS_DIR back to the home folder
    train = shlex.join([f"{up}{code}/.venv/bin/cadenza", "train",
                        _remote_experiment(launch, f"{up}{code}/"), *launch.overrides])
    start = (f"cd {RUNS_DIR} && (setsid nohup {train} > {REMOTE_LOG} 2>&1 < /dev/null & "
             f"echo $! > {REMOTE_PID})")
    steps.append(Step("start training on every worker", _gcloud(
        launch, "ssh", launch.name, "--worker=all", f"--command={start}")))
    follow = f"tail -n +1 -f --pid=$(cat {REMOTE_PID}) {REMOTE_LOG}"
    steps.append(Step("follow worker 0's log until the run ends (other workers: "
                      f"--worker=N --command='cat {REMOTE_LOG}')",
                      _gcloud(launch, "ssh", launch.name, "--worker=0", f"--command={follow}")))
    return steps


def _git(*args: str, root: pathlib.Path = PACKAGE_ROOT) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=120)
    except OSError as e:
        raise CadenzaError(f"cannot run git: {e}", where="launch",
                           fix="launch from a git checkout of cadenza") from None
    if out.returncode:
        raise CadenzaError(f"git {' '.join(args)} failed: {out.stderr.strip()}",
                           where="launch", fix="launch from a git checkout of cadenza")
    return out.stdout.strip()


def source_revision(root: pathlib.Path = PACKAGE_ROOT) -> str:
    """The commit to ship: HEAD, or a ``git stash create`` commit holding uncommitted
    changes to tracked files (untracked files are not shipped)."""
    return _git("stash", "create", root=root) or _git("rev-parse", "HEAD", root=root)


def pack(revision: str, out: str, experiment: str | None = None,
         root: pathlib.Path = PACKAGE_ROOT) -> None:
    """Write ``out`` (.tar.gz): ``git archive`` of ``revision``, a ``REVISION`` file, and
    ``experiment`` under ``run/`` if it is a local file."""
    try:
        tar_bytes = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", revision],
                                   capture_output=True, check=True, timeout=300).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise CadenzaError(f"git archive of {revision} failed: {e}", where="launch",
                           fix="launch from a git checkout of cadenza") from None
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as src, \
            tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        extra = {REVISION_FILE: (revision + "\n").encode()}
        if experiment and pathlib.Path(experiment).is_file():
            extra[f"run/{pathlib.Path(experiment).name}"] = pathlib.Path(experiment).read_bytes()
        for name, data in extra.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            dst.addfile(info, io.BytesIO(data))


def launch_tpu(launch: TpuLaunch, *, dry_run: bool = False, echo=print) -> int:
    """Run (or with ``dry_run`` print) the plan of :func:`plan`; returns an exit code.

    Each command's output streams through. The first failing command stops
    the launch with a CadenzaError naming the step.
    """
    revision = source_revision()
    archive = str(pathlib.Path(tempfile.gettempdir()) / f"cadenza-{revision[:12]}.tar.gz")
    steps = plan(launch, revision, archive, importlib.metadata.version("jax"))
    for step in steps:
        echo(step.render())
        if dry_run:
            continue
        if step.argv is None:
            pack(revision, archive, launch.experiment)
            continue
        try:
            code = subprocess.run(step.argv).returncode
        except FileNotFoundError:
            raise CadenzaError("gcloud is not installed", where="launch",
                               fix="install the Google Cloud CLI and run gcloud auth login"
                               ) from None
        if code:
            raise CadenzaError(f"step failed (exit {code}): {step.what}", where="launch",
                               fix="see the command's output above; fix it and launch again "
                                   "(without --create if the slice exists)")
    return 0
