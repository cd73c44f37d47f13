"""Training runs lose nothing: atomic model export (SIGKILL during it, then rerun and
decode), run locks, checkpoint fallback, refused hyperparameter changes on resume, a
failed first run does not poison its output dir, signals exit with distinct codes."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import pytest

from cadenza.cli import main
from cadenza.config import load_config, to_yaml
from cadenza.errors import CadenzaError
from cadenza.models import load_model
from cadenza.outputs import LOCK, MARKER
from cadenza.train import SyntheticBatches, fit

BASE = ["train.batch_size=4", "train.seq_len=16", "train.log_every=1", "train.warmup_steps=1",
        "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3",
        "train.progress_bar=false", "train.tensorboard=false", "mesh.data=1",
        "train.async_checkpoints=false"]
ONE = jax.devices()[:1]


def _config(out, *overrides):
    return load_config(None, BASE + [f"train.output_dir={out}", *overrides], preset="tiny")


def _fit(out, *overrides, **kw):
    config = _config(out, *overrides)
    return fit(config, SyntheticBatches(4, 16, config.model.vocab_size), devices=ONE, **kw)


def _hashes(d):
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One finished 4-step run (checkpoints 2 and 4, model/); tests work on copies."""
    out = tmp_path_factory.mktemp("run") / "r"
    summary = _fit(out)
    assert summary["stopped"] == "completed" and (out / "model" / MARKER).is_file()
    return out


@pytest.fixture
def copy(run, tmp_path):
    dst = tmp_path / "r"
    shutil.copytree(run, dst)
    return dst


# Reruns a run in a child that SIGKILLs itself once model/'s files are written but before
# the directory is renamed into place.
KILL_DURING_EXPORT = """
import os, signal, sys
import jax
import cadenza.outputs as outputs
from cadenza.config import load_config, to_yaml
from cadenza.train import SyntheticBatches, fit

real_swap_in = outputs._swap_in

def swap_in(tmp, target, replace):
    if target.name == "model":
        os.kill(os.getpid(), signal.SIGKILL)
    real_swap_in(tmp, target, replace)

outputs._swap_in = swap_in
config = load_config(None, sys.argv[1:], preset="tiny")
fit(config, SyntheticBatches(4, 16, config.model.vocab_size), devices=jax.devices()[:1])
"""


def test_sigkill_during_export_then_rerun_writes_model_and_it_decodes(copy, capsys):
    out = copy
    shutil.rmtree(out / "model")  # the run's last step is done: the rerun goes to the export
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_EXPORT, *BASE,
                           f"train.output_dir={out}"], timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model").exists()  # never a half-written model/
    # the killed writer's whole temp folder is left beside it
    assert list(out.glob(".model.partial-*/params.safetensors"))
    summary = _fit(out)  # rerun the same command: nothing to train, export again
    assert summary["resumed_from"] == 4 and summary["model_dir"] == str(out / "model")
    assert (out / "model" / MARKER).is_file() and not list(out.glob(".*model.partial*"))
    assert not (out / LOCK).exists()
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out / "model"), "--prompt-ids", "5,6,7",
                 "--max-new-tokens", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out.splitlines()[0])["token_ids"]) == 3


def test_emptied_model_dir_is_rewritten_on_rerun(copy, capsys):
    for p in (copy / "model").iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    with pytest.raises(CadenzaError, match="not a cadenza model directory"):
        load_model(copy / "model")
    summary = _fit(copy)
    assert summary["model_dir"] == str(copy / "model")
    load_model(copy / "model")


def test_locked_output_dir_names_the_other_run(copy, capsys):
    before = _hashes(copy)
    other = {"pid": os.getpid(), "host": socket.gethostname(), "started": "t0",
             "command": "cadenza train other"}
    (copy / LOCK).write_text(json.dumps(other))
    with pytest.raises(CadenzaError, match=f"another run \\(pid {os.getpid()} on host .*"
                                           "cadenza train other.*is writing"):
        _fit(copy, "train.steps=6", allow_changes=True)
    assert _hashes(copy) == {**before, LOCK: _hashes(copy)[LOCK]}  # nothing touched
    # a lock left by a process that is gone is taken over
    dead = subprocess.Popen(["true"])
    dead.wait()
    (copy / LOCK).write_text(json.dumps({**other, "pid": dead.pid}))
    assert _fit(copy)["stopped"] == "completed"
    assert "took over the lock" in capsys.readouterr().err and not (copy / LOCK).exists()


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(copy, capsys):
    for f in (copy / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 64:
            f.write_bytes(f.read_bytes()[:20])  # truncate every array file
    summary = _fit(copy, "train.steps=4")
    assert summary["resumed_from"] == 2 and summary["step"] == 4
    assert [s["step"] for s in summary["skipped_checkpoints"]] == [4]
    assert "skipped checkpoint step 4" in capsys.readouterr().err
    assert (copy / "checkpoints" / "skipped-4").is_dir()  # set aside, not deleted
    # every step broken: one clear error, and the run's files are left alone
    for f in (copy / "checkpoints").rglob("*"):
        if f.is_file() and f.parent.name != "checkpoints" and f.stat().st_size > 64:
            f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(CadenzaError, match="no checkpoint restores .*step 4: .*step 2: "):
        _fit(copy)


def test_corrupt_model_params_are_one_clear_error(copy, capsys):
    for f in (copy / "model").rglob("params*"):   # params.safetensors
        if f.is_file() and f.stat().st_size > 64:
            f.write_bytes(f.read_bytes()[:20])
    assert main(["generate", "--checkpoint", str(copy / "model"), "--prompt-ids", "5",
                 "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot read the params" in err
    assert len(err.strip().splitlines()) == 1 and "strict" not in err


def test_resume_with_changed_hyperparameters_is_refused_unless_allowed(copy):
    before = _hashes(copy)
    with pytest.raises(CadenzaError, match=r"train.steps: checkpoint has 4, this run has 6; "
                                           r"train.learning_rate: checkpoint has 0.0003"):
        _fit(copy, "train.learning_rate=1e-2", "train.steps=6")
    assert _hashes(copy) == before
    with pytest.raises(CadenzaError, match=r"train.seed: checkpoint has 0, this run has 5"):
        _fit(copy, "train.seed=5")
    summary = _fit(copy, "train.seed=5", allow_changes=True)  # allowed: recorded
    assert summary["resumed_from"] == 4 and summary["step"] == 4
    record = json.loads((copy / "checkpoints" / "changes.jsonl").read_text())
    assert record["resumed_from_step"] == 4
    assert record["changes"] == ["train.seed: checkpoint has 0, this run has 5"]
    assert load_config(copy / "checkpoints" / "config.yaml").train.seed == 5


def test_failed_first_run_does_not_poison_its_output_dir(tmp_path):
    from cadenza.train.checkpoints import Checkpoints

    out = tmp_path / "r"
    (out / "checkpoints").mkdir(parents=True)
    other = _config(out, "data.seed=7")  # a first run that failed before any checkpoint
    (out / "checkpoints" / "config.yaml").write_text(to_yaml(other))
    Checkpoints(out, _config(out), keep=2, async_save=False).close()  # no "cannot resume"
    assert load_config(out / "checkpoints" / "config.yaml").data.seed == 0


def test_cli_exit_codes_for_ctrl_c_and_sigterm(tmp_path, capsys, monkeypatch):
    """Ctrl-C and SIGTERM both save a checkpoint, then exit 130 / 143 (not 0)."""
    import cadenza.train.trainer as trainer

    stops = iter([(1, signal.SIGINT), (2, signal.SIGTERM)])

    class StopAt(SyntheticBatches):
        def __init__(self, *a, at):
            super().__init__(*a)
            self.at = at

        def __next__(self):
            if self.index == self.at[0]:
                os.kill(os.getpid(), self.at[1])
            return super().__next__()

    real_fit = trainer.fit
    monkeypatch.setattr(trainer, "fit", lambda config, **kw: real_fit(
        config, StopAt(4, 16, config.model.vocab_size, at=next(stops)), devices=ONE, **kw))
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(to_yaml(_config(tmp_path / "r")))
    saved = []
    for code, name in ((130, "sigint"), (143, "sigterm")):
        capsys.readouterr()
        assert main(["train", str(experiment)]) == code
        out = capsys.readouterr().out
        assert json.loads(out[out.index("{"):])["stopped"] == name
        saved.append(sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()
                            if p.name.isdigit()))
    assert saved == [["2"], ["2", "3"]]


def test_skipped_record_totals_are_reported():
    from cadenza.train.trainer import skipped_records

    class Counted(SyntheticBatches):
        build_reports = [{"skipped": {"malformed_json": 2}}, {"skipped": {"too_long": 1}}]

        def stats(self):
            return {"skipped": {"too_long": 3}}

    assert skipped_records(Counted(4, 16, 512)) == {
        "build": {"malformed_json": 2, "too_long": 1}, "formatting": {"too_long": 3}, "total": 6}
    assert skipped_records(SyntheticBatches(4, 16, 512)) is None
