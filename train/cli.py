"""``cadenza train EXPERIMENT.yaml [section.field=value ...]``: a thin layer over
:func:`cadenza.train.fit` (and :func:`cadenza.train.lud_task.finetune_lud` for configs
that set ``lud.base_model``)."""


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
        summary = fit(config)
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train an experiment (resumes if its output dir holds a checkpoint)")
    p.add_argument("experiment", help="experiment YAML file or shipped experiment name")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="overrides applied after the file, e.g. train.output_dir=runs/x")
    p.set_defaults(func=_train)
