"""Time the whole quickstart (``cadenza quickstart``): wall and CPU time per run and stage.

    .venv/bin/python bench/quickstart_bench.py [--fast | --large] [--out DIR]

Runs :func:`cadenza.quickstart.run_quickstart` into a new folder under ``runs/`` (never
one with finished stages, which a rerun would reuse instead of timing) and writes
``quickstart_bench.{json,md}`` to ``bench/results/<device>/``: device, jax version,
commit, date, host load, wall seconds, CPU seconds of the process (all threads), the
stage timings and the quickstart's own tables (training, LoRA, decoding methods).
"""

import argparse
import json
import os
import pathlib
import tempfile
import time

from cadenza.provenance import results_dir
from cadenza.quickstart import run_quickstart
from cadenza.quickstart_report import render_markdown


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--fast", action="store_true")
    size.add_argument("--large", action="store_true")
    ap.add_argument("--run-dir", default=None,
                    help="a new folder for the run (default: a fresh runs/quickstart-bench-*)")
    ap.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = ap.parse_args(argv)
    if args.run_dir is None:
        pathlib.Path("runs").mkdir(exist_ok=True)
        args.run_dir = tempfile.mkdtemp(prefix="quickstart-bench-", dir="runs")
    elif (pathlib.Path(args.run_dir) / "stages").exists():
        ap.error(f"{args.run_dir} holds finished quickstart stages (a rerun reuses them): "
                 "pass a new --run-dir")
    load_before = os.getloadavg()[0]
    wall0, cpu0 = time.perf_counter(), time.process_time()
    results = run_quickstart(out_dir=args.run_dir, fast=args.fast, large=args.large,
                             progress=False)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    bench = {"meta": {**results["meta"], "load_avg_1m_before": load_before,
                      "load_avg_1m_after": os.getloadavg()[0]},
             "wall_s": wall, "cpu_s": cpu, "quickstart": results}
    out = results_dir(__file__, args.out)
    (out / "quickstart_bench.json").write_text(json.dumps(bench, indent=2, default=str) + "\n")
    m = bench["meta"]
    md = (f"# Quickstart timing ({m['size']})\n\nwall {wall:.0f}s, CPU {cpu:.0f}s (process, all "
          f"threads) on {m['cpu_count']} cores; host load average {m['load_avg_1m_before']:.1f}"
          f" before, {m['load_avg_1m_after']:.1f} after.\n\n"
          + render_markdown(results).replace("# cadenza quickstart", "## cadenza quickstart", 1))
    (out / "quickstart_bench.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
