"""``cadenza quickstart`` (the main job end to end) and ``cadenza bench all``."""

import pathlib
import subprocess
import sys


def _quickstart(args) -> int:
    from cadenza.quickstart import run_quickstart

    run_quickstart(out_dir=args.out, fast=args.fast, large=args.large)
    return 0


def _bench_all(args) -> int:
    from cadenza.errors import CadenzaError

    script = pathlib.Path(__file__).parent / "bench" / "run_all.py"
    if not script.is_file():
        raise CadenzaError("the benchmark scripts are not installed (bench/ is part of the "
                           "source checkout only)", where=str(script.parent),
                           fix="run from a clone of the repository (make bench)")
    cmd = [sys.executable, str(script), *(["--quick"] if args.quick else []),
           *(["--only", args.only] if args.only else [])]
    return subprocess.call(cmd)


def register(subparsers) -> None:
    """Add ``quickstart`` and ``bench all``."""
    qs = subparsers.add_parser(
        "quickstart", help="the main job: data, pretrain target + draft, LoRA-tune, decode "
                           "with every method (CPU: under 10 minutes)")
    qs.add_argument("--out", default="runs/quickstart", help="output directory")
    size = qs.add_mutually_exclusive_group()
    size.add_argument("--fast", action="store_true", help="a few steps of tiny models (CI)")
    size.add_argument("--large", action="store_true",
                      help="bigger models and more steps (for a GPU/TPU)")
    qs.set_defaults(func=_quickstart)

    bench = subparsers.add_parser("bench", help="run the benchmark suite")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")
    run_all = bench_sub.add_parser(
        "all", help="run every bench/ script, then write bench/results/<device>/summary.md "
                    "and plots")
    run_all.add_argument("--quick", action="store_true",
                         help="short settings for every script (a smoke run, not for reports)")
    run_all.add_argument("--only", default=None,
                         help="comma-separated script names (e.g. train_throughput)")
    run_all.set_defaults(func=_bench_all)
