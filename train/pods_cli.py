"""Subcommands for running on pods: ``compile``, ``preflight`` and ``launch tpu``."""

import sys

from cadenza.cli import json_line


def _compile(args) -> int:
    import jax

    from cadenza.config import load_config
    from cadenza.train.aot import compile_for_slice
    from cadenza.train.topology import parse_slice

    tpu_slice = parse_slice(args.topology)
    config = load_config(args.experiment, args.overrides)
    # executables for an abstract TPU slice cannot be read back from the persistent cache
    # without a TPU client (JAX warns on every hit): compile them afresh
    jax.config.update("jax_enable_compilation_cache", False)
    print(f"compiling the train{' and decode' if args.decode else ''} step of {config.name} "
          f"for {tpu_slice.name} ({tpu_slice.topology}) ...", file=sys.stderr, flush=True)
    reports = compile_for_slice(config, tpu_slice, decode=args.decode,
                                decode_batch=args.decode_batch)
    if args.json:
        for r in reports:
            print(json_line(r, total_bytes=r.total_bytes, fits=r.fits, verdict=r.verdict()))
    else:
        print("\n\n".join(r.format() for r in reports))
    return 0 if all(r.fits for r in reports) else 1


def _preflight(args) -> int:
    from cadenza.train.distributed import initialize
    from cadenza.train.preflight import check_host

    initialize()
    facts = check_host(revision=args.expect_revision, devices=args.expect_devices,
                       jax_version=args.expect_jax, min_free_gib=args.min_free_gib,
                       disk_path=args.disk_path)
    if args.json:
        print(json_line(facts, ok=True))
    else:
        print(f"preflight ok: {facts.summary()}")  # every host reports
    return 0


def _launch_tpu(args) -> int:
    from cadenza.config import load_config
    from cadenza.train.launch import TpuLaunch, launch_tpu
    from cadenza.train.topology import parse_slice

    load_config(args.experiment, args.overrides)  # fail here, not on the pod
    tpu_slice = parse_slice(args.accelerator, "--accelerator")
    launch = TpuLaunch(name=args.name, zone=args.zone, slice=tpu_slice,
                       experiment=args.experiment, overrides=tuple(args.overrides),
                       project=args.project, create=args.create, spot=args.spot,
                       runtime_version=args.version, min_free_gib=args.min_free_gib)
    return launch_tpu(launch, dry_run=args.dry_run)


def register(sub) -> None:
    """Add ``compile``, ``preflight`` and ``launch`` to the ``cadenza`` parser."""
    comp = sub.add_parser(
        "compile", help="AOT-compile an experiment for a TPU slice; per-chip memory and FLOPs",
        description="Compile the sharded train step for a TPU slice on this machine (needs "
                    "the tpu extra, no TPU) and say whether it fits in HBM. Exit status 1 "
                    "if it does not fit.")
    comp.add_argument("experiment", help="experiment YAML file or shipped experiment name")
    comp.add_argument("overrides", nargs="*", metavar="section.field=value")
    comp.add_argument("--topology", required=True,
                      help="TPU slice: accelerator type (v5p-8, v5e-16, v4-32, v6e-256, ...) "
                           "or topology (v5e:2x2, v5p:2x2x4)")
    comp.add_argument("--decode", action="store_true", help="also compile a one-token decode step")
    comp.add_argument("--decode-batch", type=int, default=None,
                      help="decode batch size (default: train.batch_size)")
    comp.add_argument("--json", action="store_true",
                      help="one JSON object per compiled step (bytes, FLOPs, fits)")
    comp.set_defaults(func=_compile)

    pre = sub.add_parser(
        "preflight", help="check this host before a multi-host run (revision, jax, devices, disk)",
        description="Join the multi-host runtime (CADENZA_COORDINATOR/NUM_PROCESSES/PROCESS_ID "
                    "or cluster auto-detection) and check this host; exit 2 on a mismatch.")
    pre.add_argument("--expect-revision", default=None, help="code revision (git SHA or prefix)")
    pre.add_argument("--expect-devices", type=int, default=None, help="global device count")
    pre.add_argument("--expect-jax", default=None, help="jax version, e.g. 0.12.0.1")
    pre.add_argument("--min-free-gib", type=float, default=0.0, help="free disk needed")
    pre.add_argument("--disk-path", default=".", help="where the free disk is measured")
    pre.add_argument("--json", action="store_true", help="print this host's facts as JSON")
    pre.set_defaults(func=_preflight)

    launch = sub.add_parser("launch", help="launch a run on a cluster")
    launch_sub = launch.add_subparsers(dest="launch_target", metavar="TARGET")
    tpu = launch_sub.add_parser(
        "tpu", help="run an experiment on a Cloud TPU slice with gcloud",
        description="Copy this checkout to every worker of a TPU VM slice, install it, run "
                    "a preflight on every worker, start cadenza train everywhere and follow "
                    "worker 0's log.")
    tpu.add_argument("experiment", help="experiment YAML file or shipped experiment name")
    tpu.add_argument("overrides", nargs="*", metavar="section.field=value")
    tpu.add_argument("--name", required=True, help="TPU VM name")
    tpu.add_argument("--zone", required=True, help="e.g. us-east5-a")
    tpu.add_argument("--accelerator", required=True, help="e.g. v5p-32, v5e-16")
    tpu.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
    tpu.add_argument("--create", action="store_true", help="create the TPU VM first")
    tpu.add_argument("--spot", action="store_true", help="with --create: a spot VM")
    tpu.add_argument("--version", default=None, help="TPU VM software version for --create")
    tpu.add_argument("--min-free-gib", type=float, default=20.0,
                     help="free disk each worker needs (preflight)")
    tpu.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    tpu.set_defaults(func=_launch_tpu)
