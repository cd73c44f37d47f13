"""``cadenza data build`` and ``cadenza data inspect``."""

import json
import pathlib
import sys


def _build(args) -> int:
    from cadenza.config import load_config
    from cadenza.errors import ConfigError
    from cadenza.train.data import builders

    if args.input or args.format:
        if not (args.input and args.format and args.out) or args.experiment:
            raise ConfigError("direct builds need --format, --input and --out (and no CONFIG)",
                              where="cadenza data build",
                              fix="e.g. cadenza data build --format alpaca --input a.jsonl "
                                  "--out data/")
        overrides = [f"data.format={args.format}", f"data.path={args.input}",
                     f"data.on_error={args.on_error or 'skip'}"]
        config = load_config(None, overrides)
        sources, data_dir = config.data.sources(), args.out
        if pathlib.Path(args.out).exists() and not pathlib.Path(args.out).is_dir():
            raise ConfigError("--out names an existing file; it must be a folder (the build "
                              "writes a dataset folder in it)", where=args.out,
                              fix="pass a new or existing folder")
    else:
        if not args.experiment:
            raise ConfigError("give an experiment CONFIG or --format/--input/--out",
                              where="cadenza data build", fix="see cadenza data build --help")
        extra = [f"data.on_error={args.on_error}"] if args.on_error else []
        config = load_config(args.experiment, list(args.overrides) + extra)
        sources, data_dir = [s for s in config.data.sources() if s.format != "tfds"], None
    for i, source in enumerate(sources):
        print(f"[{i + 1}/{len(sources)}] preparing {source.format} "
              f"{source.path or source.name or ''}".rstrip(), file=sys.stderr, flush=True)
        report = builders.build(source, config.data, data_dir, rebuild=args.rebuild)
        if args.json:  # one object per dataset: the build report
            print(json.dumps(report))
            continue
        print(f"{report['name']} -> {report['data_dir']}")
        print(f"  read {report['read']}, written {report['written']} "
              f"(splits {report['splits']}, files {report['shards']}), "
              f"skipped {sum(report['skipped'].values())}"
              + (f" by reason {json.dumps(report['skipped'])}" if report["skipped"] else ""))
    return 0


def _inspect(args) -> int:
    from cadenza.config import load_config
    from cadenza.train.data.inspect import inspect_data

    config = load_config(args.experiment, args.overrides)
    print(inspect_data(config, examples=args.examples, split=args.split, batches=args.batches))
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare and inspect training data")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    build = sub.add_parser("build", help="prepare datasets (TFDS array_record)",
                           description="Prepare the datasets of an experiment CONFIG, or one "
                                       "input file directly with --format/--input/--out. Prints "
                                       "records read, written and skipped by reason.")
    build.add_argument("experiment", nargs="?", help="experiment YAML or shipped name")
    build.add_argument("overrides", nargs="*", metavar="section.field=value")
    build.add_argument("--format", choices=("alpaca", "sharegpt", "messages", "text",
                                            "preference"),
                       help="record format of --input (see docs/data.md)")
    build.add_argument("--input", help="input file, directory or glob")
    build.add_argument("--out", help="output data dir")
    build.add_argument("--on-error", choices=("skip", "stop"), default=None,
                       help="skip and count bad records (default) or stop at the first")
    build.add_argument("--rebuild", action="store_true", help="rebuild even if prepared")
    build.add_argument("--json", action="store_true",
                       help="print each dataset's build report as one JSON object")
    build.set_defaults(func=_build)
    inspect = sub.add_parser("inspect", help="show formatted examples with loss masks, and counts")
    inspect.add_argument("experiment", help="experiment YAML or shipped name")
    inspect.add_argument("overrides", nargs="*", metavar="section.field=value")
    inspect.add_argument("-n", "--examples", type=int, default=3, help="examples per dataset")
    inspect.add_argument("--split", default="train", help="dataset split to show")
    inspect.add_argument("--batches", type=int, default=4, help="iterator batches to count")
    inspect.set_defaults(func=_inspect)
