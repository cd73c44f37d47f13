"""`cadenza launch tpu` plans and runs gcloud steps; `cadenza preflight` checks a host."""

import dataclasses
import re
import stat
import tarfile
import tempfile

import jax
import pytest

from cadenza.cli import main
from cadenza.errors import CadenzaError
from cadenza.train.launch import TpuLaunch, launch_tpu, pack
from cadenza.train.preflight import code_revision, host_facts, mismatches
from cadenza.train.topology import GIB, parse_slice

LAUNCH = ["launch", "tpu", "--name", "pod1", "--zone", "us-east5-a", "--accelerator", "v5p-32",
          "tiny_pretrain", "train.steps=10"]


def commands(out: str) -> list[str]:
    return [line for line in out.splitlines() if not line.startswith("#")]


def test_dry_run_prints_the_whole_plan(capsys):
    assert main(LAUNCH + ["--create", "--spot", "--dry-run"]) == 0
    out = capsys.readouterr().out
    cmds = commands(out)
    rev = re.search(r"# pack revision ([0-9a-f]{40}) into (\S+)", out)
    assert rev, out
    revision, archive = rev.groups()
    zone = "--zone=us-east5-a"
    assert cmds[0] == ("gcloud compute tpus tpu-vm create pod1 --accelerator-type=v5p-32 "
                       f"--version=v2-alpha-tpuv5 --spot {zone}")
    assert cmds[1] == (f"gcloud compute tpus tpu-vm scp {archive} "
                       f"'pod1:~/cadenza-{revision[:12]}.tar.gz' --worker=all {zone}")
    assert "--worker=all" in cmds[2] and "uv sync --frozen --extra tpu" in cmds[2]
    assert (f".venv/bin/cadenza preflight --expect-revision {revision} --expect-devices 16 "
            f"--expect-jax {jax.__version__} --min-free-gib 20") in cmds[3]
    assert "--worker=all" in cmds[3]
    code = f"cadenza/code/{revision[:12]}"
    assert (f"cd cadenza/runs && (setsid nohup ../../{code}/.venv/bin/cadenza train tiny_pretrain "
            "train.steps=10 > ~/cadenza-train.log") in cmds[4]
    assert "--worker=all" in cmds[4]
    # code and outputs are apart: the only deletion is this revision's code folder
    assert [c for c in cmds if "rm " in c] == [cmds[2]]
    assert re.findall(r"rm -rf (\S+);", cmds[2]) == [code]
    assert cmds[5].startswith("gcloud compute tpus tpu-vm ssh pod1 --worker=0 '--command=tail")
    assert len(cmds) == 6
    assert "create the v5p-32 slice (4 workers)" in out


def test_dry_run_without_create_and_with_a_local_experiment_file(tmp_path, capsys):
    exp = tmp_path / "my_exp.yaml"
    exp.write_text("model:\n  preset: tiny\n")
    assert main(["launch", "tpu", "--name", "p", "--zone", "z", "--accelerator", "v5e-16",
                 str(exp), "--project", "proj", "--dry-run"]) == 0
    cmds = commands(capsys.readouterr().out)
    assert not any(" create " in c for c in cmds)
    assert all(c.endswith("--zone=z --project=proj") for c in cmds)
    assert "--expect-devices 16" in cmds[2]
    assert re.search(r"\.venv/bin/cadenza train \.\./\.\./cadenza/code/\w+/run/my_exp\.yaml >",
                     cmds[3])


def test_launch_rejects_bad_configs_before_any_command(capsys):
    assert main(LAUNCH[:-1] + ["train.stepz=10", "--dry-run"]) == 2
    assert "stepz" in capsys.readouterr().err


def test_pack_ships_the_revision_and_the_experiment(tmp_path):
    revision = code_revision()
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: x\n")
    out = tmp_path / "code.tar.gz"
    pack(revision, str(out), str(exp))
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        assert {"cli.py", "train/launch.py", "pyproject.toml", "uv.lock", "REVISION",
                "run/exp.yaml"} <= names
        assert tar.extractfile("REVISION").read().decode().strip() == revision


def test_launch_runs_steps_in_order_and_stops_at_a_failed_preflight(tmp_path, monkeypatch):
    log = tmp_path / "gcloud.log"
    gcloud = tmp_path / "bin" / "gcloud"
    gcloud.parent.mkdir()
    gcloud.write_text(f'#!/bin/sh\necho "$*" >> {log}\n'
                      'case "$*" in *preflight*) echo "preflight failed on w3"; exit 3;; esac\n')
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{gcloud.parent}:/usr/bin:/bin")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    launch = TpuLaunch(name="pod1", zone="z", slice=parse_slice("v5e-16"),
                       experiment="tiny_pretrain")
    with pytest.raises(CadenzaError, match=r"step failed \(exit 3\): preflight on every worker"):
        launch_tpu(launch, echo=lambda s: None)
    calls = log.read_text().splitlines()
    assert [c.split()[3] for c in calls] == ["scp", "ssh", "ssh"]
    assert "preflight" in calls[2] and not any("cadenza train" in c for c in calls)
    assert len(list(tmp_path.glob("cadenza-*.tar.gz"))) == 1


def test_preflight_passes_and_fails_with_every_mismatch_named(capsys):
    revision = code_revision()
    assert revision
    assert main(["preflight", "--expect-revision", revision[:10], "--expect-devices", "8",
                 "--expect-jax", jax.__version__]) == 0
    assert "preflight ok:" in capsys.readouterr().out
    assert main(["preflight", "--expect-revision", "0" * 40, "--expect-devices", "16",
                 "--expect-jax", "0.0.1", "--min-free-gib", "1e9"]) == 2
    err = capsys.readouterr().err
    assert "preflight failed on" in err
    for part in (f"code revision is {revision}, expected {'0' * 40}",
                 "sees 8 devices, expected 16", f"has jax {jax.__version__}, expected 0.0.1",
                 "GiB free disk, needs 1e+09 GiB"):
        assert part in err


def test_mismatches_checks_only_what_is_expected():
    facts = dataclasses.replace(host_facts(), revision="abc123", devices=4, free_bytes=5 * GIB)
    assert mismatches(facts) == []
    assert mismatches(facts, revision="abc1", devices=4, min_free_gib=5) == []
    assert mismatches(dataclasses.replace(facts, revision=None), revision="abc1") == [
        "code revision is unknown, expected abc1"]
