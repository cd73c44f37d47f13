"""scripts/gpu_check.py, the prepared GPU check, on CPU: the dry run checks every step's
flags against its script, the per-step time limits and the overall budget hold, and
what travels to the GPU machine (wheels + working tree) fits its 64 MiB."""

import importlib.util
import json
import os
import pathlib
import subprocess
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_dry_run_prints_every_step_and_their_flags_parse(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for step in gpu_check.STEPS:
        assert f"] {step.name} (limit {step.limit_s} s)" in out
    assert (ROOT / "tests" / "test_kernels_gpu.py").read_text().count(
        "CADENZA_GPU_KERNEL_TESTS") >= 1   # the switch the kernel-tests step sets


def test_dry_run_reports_a_flag_the_script_rejects(capsys):
    bad = gpu_check.Step("x", (gpu_check.PY, "bench/train_throughput.py", "--no-such-flag"),
                         10, "x")
    assert gpu_check.dry_run((bad,), 10) == 1
    assert "x: bench/train_throughput.py rejected its flags" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown step"):
        gpu_check.select("device,nope")


def _py(code):
    return (gpu_check.PY, "-c", code)


def test_run_limits_each_step_and_the_budget(tmp_path):
    """A hanging step is killed at its limit and the run goes on; a failing one is
    reported and its fallback runs (a passing one's does not); a step the budget cannot
    cover is skipped; results are stamped and packed."""
    results = tmp_path / "repo" / "bench" / "results"
    made = results / "cpu" / "made.json"
    steps = (gpu_check.Step("writes", _py(f"import pathlib; p = pathlib.Path({str(made)!r}); "
                                          "p.parent.mkdir(parents=True); p.write_text('{}')"),
                            30, "writes a results file"),
             gpu_check.Step("not-needed", _py("raise SystemExit(4)"), 30, "fallback",
                            only_if_failed="writes"),
             gpu_check.Step("fails", _py("raise SystemExit(3)"), 30, "fails"),
             gpu_check.Step("fallback", _py("pass"), 30, "fallback", only_if_failed="fails"),
             gpu_check.Step("hangs", _py("import time; time.sleep(60)"), 30, "hangs"),
             gpu_check.Step("late", _py("pass"), 30, "no budget left"))
    out = tmp_path / "out"
    gpu_check.MIN_STEP_S, old = 1, gpu_check.MIN_STEP_S
    try:
        # "hangs" gets what is left of the budget, is killed when it is spent, and
        # leaves nothing for "late"
        rc = gpu_check.run(steps, out, budget_s=6, results=results)
    finally:
        gpu_check.MIN_STEP_S = old
    assert rc == 1
    summary = json.loads((results / "cpu" / "gpu_check.json").read_text())
    status = {r["step"]: r["status"] for r in summary["steps"]}
    assert status["writes"] == "passed" and status["hangs"] == "timed out"
    assert status["fails"] == "failed" and status["late"].startswith("skipped")
    assert status["not-needed"] == "not needed" and status["fallback"] == "passed"
    assert summary["meta"]["jax"] and summary["meta"]["date"]
    with tarfile.open(out / "gpu_check_results.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["bench/results/cpu/gpu_check.json",
                                          "bench/results/cpu/gpu_check.md",
                                          "bench/results/cpu/made.json"]
    assert "===== hangs: timed out" in (out / "gpu_check.log").read_text()


def test_a_required_step_that_fails_skips_the_rest(tmp_path):
    steps = (gpu_check.Step("device", _py("raise SystemExit(1)"), 30, "no GPU", required=True),
             gpu_check.Step("bench", _py("pass"), 30, "would run on the CPU"))
    assert gpu_check.run(steps, tmp_path / "out", 60, results=tmp_path / "b" / "results") == 1
    summary = json.loads((tmp_path / "b" / "results" / "cpu" / "gpu_check.json").read_text())
    assert [r["status"] for r in summary["steps"]] == ["failed", "skipped (device did not pass)"]


def test_wheels_and_working_tree_fit_what_travels():
    """Declared wheel sizes (or the downloaded folder, when present) + the working tree
    stay under 64 MiB; a downloaded folder holds exactly the declared wheels."""
    wheels = ROOT / ".gpu-wheels"
    declared = gpu_check.declared_wheel_bytes()
    assert 0 < declared < 16 * 2 ** 20
    if (wheels / ".done").exists():
        got = sorted(p.stat().st_size for p in wheels.glob("*.whl"))
        lines = [ln for f in sorted((ROOT / "scripts" / "gpu").glob("wheels*.txt"))
                 for ln in f.read_text().splitlines() if ln and not ln.startswith("#")]
        assert len(got) == len(lines), sorted(p.name for p in wheels.glob("*.whl"))
        assert sum(got) == pytest.approx(declared, rel=0.01)
        total = gpu_check.travelling_bytes([wheels])
    else:
        total = gpu_check.travelling_bytes([]) + declared
    assert total < gpu_check.TRAVEL_LIMIT, f"{total / 2 ** 20:.1f} MiB would travel"


def test_cli_requires_a_mode_and_the_shell_script_the_bundle(tmp_path):
    with pytest.raises(SystemExit) as e:
        gpu_check.main([])
    assert e.value.code == 2
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path)],
                          capture_output=True, text=True,
                          env={**os.environ, "GPU_WHEELS": str(tmp_path / "none")})
    assert proc.returncode == 2
    assert "COMMIT missing: run 'make gpu-bundle'" in proc.stderr
