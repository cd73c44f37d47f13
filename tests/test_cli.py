"""The ``cadenza`` command line: help, config show, and clean user errors."""

import subprocess
import sys

import pytest

from cadenza.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "cadenza", *args], capture_output=True,
                          text=True, timeout=120)


def test_help_lists_subcommands():
    r = _run("--help")
    assert r.returncode == 0 and "config" in r.stdout and "quickstart" in r.stdout


def test_config_show_prints_resolved_config(capsys):
    assert main(["config", "show", "tiny_pretrain", "train.steps=5", "model.num_layers=3"]) == 0
    out = capsys.readouterr().out
    assert "steps: 5" in out and "num_layers: 3" in out and "preset: tiny" in out


@pytest.mark.parametrize("args, needle", [
    (["config", "show", "tiny_pretrain", "train.stepz=5"], "Did you mean 'steps'?"),
    (["config", "show", "no_such_experiment"], "not found"),
    (["config", "show", "tiny_pretrain", "model.num_layers=0"], "1 <= num_layers"),
])
def test_user_error_is_one_line_exit_2_no_traceback(args, needle):
    r = _run(*args)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_debug_flag_shows_traceback():
    r = _run("--debug", "config", "show", "tiny_pretrain", "train.stepz=5")
    assert r.returncode != 0 and "Traceback" in r.stderr

