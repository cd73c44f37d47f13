"""``cadenza train EXPERIMENT.yaml [section.field=value ...]``: a thin layer over
:func:`cadenza.train.fit` (and :func:`cadenza.train.lud_task.finetune_lud` for configs
that set ``lud.base_model``).

Exit status: 0 when the run completed, 2 for a user error, 143 when it stopped on SIGTERM
and 130 when it stopped on Ctrl-C (both after saving a checkpoint; rerun to resume), so a
scheduler can tell a preemption from a finished run."""

# Exit status of a run that saved and stopped on a signal (the shell's 128 + signal number).
STOPPED_EXIT = {"sigterm": 143, "sigint": 130}


def _train(args) -> int:
    import json

    from cadenza.config import load_config
    from cadenza.train.distributed import initialize
    from cadenza.train.trainer import fit

    initialize()  # multi-host: join the other processes first (no-op for one process)
    config = load_config(args.experiment, args.overrides)
    if config.lud.base_model:  # LUD fine-tuning: mark units with the base, then fit
        from cadenza.train.lud_task import finetune_lud

        summary, _, stats = finetune_lud(config)
        summary = {**summary, "lud_rows": stats}
    else:
        summary = fit(config, allow_changes=args.allow_changes)
    print(json.dumps(summary, indent=2))
    return STOPPED_EXIT.get(summary["stopped"], 0)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train an experiment (resumes if its output dir holds a checkpoint)")
    p.add_argument("experiment", help="experiment YAML file or shipped experiment name")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="overrides applied after the file, e.g. train.output_dir=runs/x")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume even though training hyperparameters (learning rate, steps, "
                        "batch size, ...) differ from the checkpoint's; the changes are "
                        "recorded in checkpoints/changes.jsonl")
    p.set_defaults(func=_train)
