"""The prepared hardware check for a lent GPU machine: kernel tests and benchmarks, one run.

On the GPU machine (repo root; scripts/gpu_check.sh installs the carried wheels and
cadenza first, then calls this)::

    python3 scripts/gpu_check.py --out "$OUT"

Here, with no GPU::

    .venv/bin/python scripts/gpu_check.py --dry-run       # print every step, check its flags
    .venv/bin/python scripts/gpu_check.py --bundle .gpu-wheels   # stamp commit, check size

Each step is one subprocess with its own time limit (its whole process group is killed
when it runs over, so one hang costs only its own limit), run in :data:`STEPS` order while
the overall budget lasts (``--budget-s``, default 440 s: with the install and the
summary the whole run stays under 8 minutes): a step gets the smaller of its limit and
what is left, and one that would get under 30 s is skipped and reported. The
benchmarks write their usual stamped results files (:mod:`cadenza.provenance`) under
``bench/results/<device>/``; at the end this writes ``gpu_check.{json,md}`` (the step
table, stamped) beside them and packs every results file the run wrote into
``<out>/gpu_check_results.tar.gz`` (paths from the repo root: untar there, commit), with
the full log in ``<out>/gpu_check.log`` and the kernel tests' JUnit XML beside it.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import runpy
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from unittest import mock

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAVEL_LIMIT = 64 * 2 ** 20        # bytes of working tree + carried paths a device call takes
MIN_STEP_S = 30                    # a step with less time than this left is skipped
PY = "{python}"                    # replaced by the interpreter running this script
# the fallback steps' results (XLA attention), apart from the steps' own
XLA_RESULTS = "bench/results/gpu-xla-attention"


@dataclasses.dataclass(frozen=True)
class Step:
    """One subprocess of the check: ``argv`` (``{python}`` and ``{out}`` filled in at run
    time), its time limit in seconds, extra environment, and what it measures."""
    name: str
    argv: tuple[str, ...]
    limit_s: int
    what: str
    env: tuple[tuple[str, str], ...] = ()
    only_if_failed: str | None = None    # a fallback: runs only when this step did not pass
    required: bool = False               # when it does not pass, the later steps are skipped

    def command(self, python: str, out: pathlib.Path) -> list[str]:
        """The argv to run, placeholders filled."""
        return [a.replace(PY, python).replace("{out}", str(out)) for a in self.argv]

    @property
    def script(self) -> str | None:
        """The bench script this step runs (None for pytest / inline steps)."""
        return next((a for a in self.argv if a.startswith("bench/")), None)


# In priority order: correctness first, then the numbers the goals name.
STEPS = (
    Step("device", (PY, "-c", "import jax; print('jax', jax.__version__, jax.devices()); "
                              "assert jax.default_backend() == 'gpu', 'JAX sees no GPU'"),
         60, "JAX sees the GPU (version, devices); without one the rest is skipped",
         required=True),
    Step("kernel-tests", (PY, "-m", "pytest", "tests/test_kernels_gpu.py", "-q",
                          "-p", "no:cacheprovider", "--junitxml={out}/kernels_gpu_tests.xml"),
         150, "Mosaic GPU decode/verify + flash fwd/bwd kernels vs the jnp reference, "
              "on hardware",
         # tests/conftest.py defaults JAX_PLATFORMS to cpu: name the GPU explicitly
         env=(("CADENZA_GPU_KERNEL_TESTS", "hardware"), ("JAX_PLATFORMS", "cuda"))),
    Step("attention-bench", (PY, "bench/kernels_attention.py", "--upstream", "--iters", "10"),
         180, "flash fwd/bwd TFLOP/s: ours vs cuDNN vs XLA vs jax attention_mgpu vs "
              "tokamax; verify T=1,4,16,64 as a fraction of HBM bandwidth, with jax's "
              "Triton decode/paged kernels"),
    Step("decode-1b", (PY, "bench/decode_throughput.py", "--configs", "1b", "--batches", "1,16",
                       "--dtype", "bfloat16", "--hf-python", PY, "--prompt-len", "128",
                       "--new-tokens", "128", "--repeats", "3"),
         180, "bf16 greedy decode at ~1.1B params, batch 1 and 16: tokens/s, % of the HBM "
              "roofline, vs transformers (torch, same weights) on the same GPU",
         env=(("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5"),)),
    # cadenza's own GPU kernels serve decode and training under attention_impl=auto and
    # have never run on hardware: if they fail, the same numbers with XLA attention
    Step("decode-1b-xla", (PY, "bench/decode_throughput.py", "--configs", "1b", "--batches",
                           "1,16", "--dtype", "bfloat16", "--hf-python", PY, "--prompt-len",
                           "128", "--new-tokens", "128", "--repeats", "3",
                           "--override", "model.attention_impl=xla", "--out", XLA_RESULTS),
         150, "decode-1b with XLA attention (only if decode-1b failed)",
         env=(("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5"),), only_if_failed="decode-1b"),
    Step("train-1b-full", (PY, "bench/train_throughput.py", "--setups", "1b:bfloat16:full",
                           "--no-torch", "--repeats", "5", "--name", "train_throughput_1b"),
         120, "full fine-tuning step at ~1.1B params (bf16 compute): tokens/s and MFU"),
    Step("train-1b-full-xla", (PY, "bench/train_throughput.py", "--setups", "1b:bfloat16:full",
                               "--no-torch", "--repeats", "5", "--name", "train_throughput_1b",
                               "--override", "model.attention_impl=xla", "--out", XLA_RESULTS),
         120, "train-1b-full with XLA attention (only if train-1b-full failed)",
         only_if_failed="train-1b-full"),
    Step("train-1b-lora", (PY, "bench/train_throughput.py", "--setups", "1b:bfloat16:lora",
                           "--no-torch", "--repeats", "5", "--name", "train_throughput_1b_lora"),
         100, "LoRA (rank 8) step at ~1.1B params (bf16 compute): tokens/s and MFU"),
    Step("speculative-sweep", (PY, "bench/speculative_bench.py", "--sweep-only",
                               "--repeats", "5"),
         90, "fwd(T)/fwd(1) on the GPU: when a verify forward is nearly free"),
    Step("quant-decode", (PY, "bench/quant_bench.py", "--configs", "100m", "--repeats", "5"),
         90, "greedy decode at ~112M params with fp32/bf16/int8/int4 weights and a float "
             "or int8 KV cache: ms/step, bytes, weight GB/s read"),
)


def select(only: str | None) -> tuple[Step, ...]:
    """The steps named in the comma list ``only`` (all when None), in :data:`STEPS` order."""
    if not only:
        return STEPS
    names = only.split(",")
    unknown = sorted(set(names) - {s.name for s in STEPS})
    if unknown:
        raise SystemExit(f"error: --only: unknown step(s) {', '.join(unknown)}; steps: "
                         f"{', '.join(s.name for s in STEPS)}")
    return tuple(s for s in STEPS if s.name in names)


class _Parsed(Exception):
    pass


def check_flags(step: Step) -> str | None:
    """Run ``step``'s bench script in this process until its argparse has parsed the step's
    flags, then stop it: None when they parse, else what went wrong. Runs no benchmark."""
    script = step.script
    if script is None:
        return None
    path = ROOT / script
    if not path.is_file():
        return f"{script} does not exist"
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise _Parsed(parse(parser, args, namespace))

    argv = step.command(sys.executable, pathlib.Path("OUT"))
    argv = argv[argv.index(script):]
    with (mock.patch("argparse.ArgumentParser.parse_args", parse_then_stop),
          mock.patch.object(sys, "argv", [str(path), *argv[1:]]),
          mock.patch.object(sys, "path", [str(path.parent), *sys.path])):
        try:
            runpy.run_path(str(path), run_name="__main__")
        except _Parsed:
            return None
        except SystemExit as e:
            return f"{script} rejected its flags (exit {e.code})"
    return f"{script} ran without parsing flags"


def dry_run(steps: tuple[Step, ...], budget_s: int) -> int:
    """Print every step (command, limit, environment) and check each one's script accepts
    its flags; 0 when all do."""
    problems, total = [], 0
    for i, step in enumerate(steps, 1):
        total += step.limit_s
        env = " ".join(f"{k}={v}" for k, v in step.env)
        print(f"[{i}/{len(steps)}] {step.name} (limit {step.limit_s} s): {step.what}\n"
              f"    {env + ' ' if env else ''}"
              f"{shlex.join(step.command('python3', pathlib.Path('$OUT')))}")
        if (err := check_flags(step)) is not None:
            problems.append(f"{step.name}: {err}")
    print(f"{len(steps)} steps, limits add up to {total} s; overall budget {budget_s} s "
          "(later steps are skipped when it runs out)")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


def run_step(step: Step, out: pathlib.Path, limit: int, log) -> dict:
    """Run one step with ``limit`` seconds, its output appended to ``log``; its row."""
    cmd = step.command(sys.executable, out)
    log.write(f"\n===== {step.name} (limit {limit} s): {' '.join(cmd)}\n")
    log.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **dict(step.env)}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=limit)
        status = "passed" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc, status = proc.wait(), "timed out"
    seconds = time.monotonic() - t0
    log.write(f"===== {step.name}: {status} (rc {rc}) in {seconds:.0f} s\n")
    log.flush()
    return {"step": step.name, "status": status, "rc": rc, "seconds": round(seconds, 1),
            "limit_s": limit, "what": step.what, "command": cmd}


def results_written_since(base: pathlib.Path, start: float) -> list[pathlib.Path]:
    """Files under ``base`` modified at or after ``start`` (wall clock)."""
    return sorted(p for p in base.rglob("*") if p.is_file() and p.stat().st_mtime >= start)


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# GPU check on {meta['device_kind']}", "",
             f"jax {meta['jax']}, commit {meta['commit']}, {meta['date']}. Each step's "
             "results file is beside this one; the full log is gpu_check.log.", "",
             "| step | status | seconds | limit | what |", "|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']} | {r['limit_s']} | {r['what']} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def run(steps: tuple[Step, ...], out: pathlib.Path, budget_s: int,
        results: pathlib.Path = ROOT / "bench" / "results") -> int:
    """Run ``steps`` within ``budget_s``; write the stamped summary under
    ``results/<device>/`` and the log, summary and an archive of every file written under
    ``results`` (paths from the repo root) to ``out``. 0 when every step passed."""
    out.mkdir(parents=True, exist_ok=True)
    start_wall, start = time.time() - 1, time.monotonic()
    rows = []
    with open(out / "gpu_check.log", "a") as log:
        for step in steps:
            left = int(budget_s - (time.monotonic() - start))
            primary = next((r for r in rows if r["step"] == step.only_if_failed), None)
            if step.only_if_failed and (primary is None or primary["status"] == "passed"):
                rows.append({"step": step.name, "status": "not needed", "rc": None,
                             "seconds": 0, "limit_s": step.limit_s, "what": step.what})
                continue
            broken = next((r["step"] for r in rows if r.get("required")
                           and r["status"] != "passed"), None)
            if left < MIN_STEP_S or broken:
                why = f"{broken} did not pass" if broken else "budget spent"
                rows.append({"step": step.name, "status": f"skipped ({why})", "rc": None,
                             "seconds": 0, "limit_s": step.limit_s, "what": step.what})
                continue
            rows.append({**run_step(step, out, min(step.limit_s, left), log),
                         "required": step.required})
            print(f"{rows[-1]['step']}: {rows[-1]['status']} in {rows[-1]['seconds']} s",
                  flush=True)
    # Every child is done: this process may take the GPU now, to stamp the summary.
    from cadenza.provenance import device_label, provenance

    meta = provenance(ROOT)
    res = results / device_label()
    res.mkdir(parents=True, exist_ok=True)
    (res / "gpu_check.json").write_text(json.dumps({"meta": meta, "steps": rows}, indent=2)
                                        + "\n")
    md = _markdown(meta, rows)
    (res / "gpu_check.md").write_text(md)
    (out / "gpu_check.md").write_text(md)
    files = results_written_since(results, start_wall)
    tmp = out / "gpu_check_results.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=str(f.relative_to(results.parent.parent)))
    tmp.replace(out / "gpu_check_results.tar.gz")
    print(md + f"\n{len(files)} results files in {out / 'gpu_check_results.tar.gz'}")
    return 0 if all(r["status"] in ("passed", "not needed") for r in rows) else 1


def travelling_bytes(extra: list[pathlib.Path]) -> int:
    """Bytes a device call takes: tracked and untracked-not-ignored files of this checkout
    (links count as links) plus every file under the ``extra`` (carried) paths."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
                           ).stdout.decode().split("\0")
    total = sum((ROOT / n).lstat().st_size for n in names if n and os.path.lexists(ROOT / n))
    for path in extra:
        total += sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())
    return total


def declared_wheel_bytes() -> int:
    """Sum of the wheel sizes scripts/gpu/wheels*.txt declare (each line's ``# bytes``)."""
    total = 0
    for f in sorted((ROOT / "scripts" / "gpu").glob("wheels*.txt")):
        for line in f.read_text().splitlines():
            if line and not line.startswith("#"):
                total += int(line.rsplit("#", 1)[1])
    return total


def bundle(wheels: pathlib.Path) -> int:
    """Stamp ``wheels``/COMMIT (HEAD, ``-dirty`` with uncommitted changes) and check the
    wheels plus the working tree fit what a device call takes; 0 when they do."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    (wheels / "COMMIT").write_text(head + ("-dirty" if dirty else "") + "\n")
    total = travelling_bytes([wheels])
    print(f"commit {head}{'-dirty' if dirty else ''}; working tree + {wheels}: "
          f"{total / 2 ** 20:.1f} MiB of {TRAVEL_LIMIT / 2 ** 20:.0f} MiB")
    if total >= TRAVEL_LIMIT:
        print("error: too large to travel to the GPU machine: ignore or remove what need "
              "not go", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", type=pathlib.Path, help="run the check, results to this folder")
    mode.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    mode.add_argument("--bundle", type=pathlib.Path, metavar="WHEELS",
                      help="stamp the commit into WHEELS and check what travels fits")
    p.add_argument("--only", help="comma list of steps (default: all)")
    p.add_argument("--budget-s", type=int, default=440, help="overall seconds for all steps")
    args = p.parse_args(argv)
    if args.bundle:
        return bundle(args.bundle)
    steps = select(args.only)
    if args.dry_run:
        return dry_run(steps, args.budget_s)
    return run(steps, args.out.resolve(), args.budget_s)


if __name__ == "__main__":
    raise SystemExit(main())
