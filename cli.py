"""The ``cadenza`` command line: one entry point, one subcommand per job.

Each subcommand is a thin layer over a library function. A user error
(:class:`cadenza.errors.CadenzaError`; also a full disk, a read-only file system or a
permission error) prints one line, ``error: ...``, and exits with status 2; ``--debug``
shows the traceback instead. Ctrl-C outside a training loop exits with 130.
"""

import argparse
import gc
import importlib
import json
import sys

from cadenza import __version__
from cadenza.errors import CadenzaError
from cadenza.outputs import disk_errors
from cadenza.runtime_env import HOST_MEMORY_CHOICES, configure_cli

# Modules that add subcommands: each has ``register(subparsers)``, imports
# nothing heavy at module level, and sets ``func`` on its parsers.
AREA_COMMANDS: tuple[str, ...] = (
    "cadenza.models.cli",
    "cadenza.decode.ngram_cli",
    "cadenza.train.cli",
    "cadenza.train.data_cli",
    "cadenza.decode.cli",
    "cadenza.serve.cli",
    "cadenza.train.peft_cli",
    "cadenza.train.merge_cli",
    "cadenza.train.pods_cli",
    "cadenza.quickstart_cli",
)


CONVERT_HELP = "convert models and adapters (Hugging Face, peft)"


def command_group(subparsers, name: str, help: str):
    """The sub-parsers of the command ``name`` (e.g. ``convert``), creating it on first use,
    so that several areas can add subcommands to one command in any order."""
    parser = subparsers.choices.get(name)
    if parser is None:
        parser = subparsers.add_parser(name, help=help)
        return parser.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def json_line(record, **extra) -> str:
    """One JSON line for a report dataclass ``record`` (numpy arrays as lists) plus
    ``extra`` fields (e.g. its derived properties): what ``--json`` options print."""
    import dataclasses

    def plain(value):
        if hasattr(value, "tolist"):  # numpy arrays and scalars
            return value.tolist()
        raise TypeError(f"not JSON serialisable: {type(value).__name__}")

    return json.dumps({**dataclasses.asdict(record), **extra}, default=plain)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default (unless it is None/False or already stated)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default not in (None, False, argparse.SUPPRESS) and "default" not in text
                and action.option_strings):
            text = f"{text} (default: %(default)s)".strip()
        return text


def _use_defaults_formatter(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and every sub-parser below it :class:`DefaultsHelpFormatter`."""
    parser.formatter_class = DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                _use_defaults_formatter(child)


def _first_comment(path) -> str:
    """The first ``# ...`` line of a YAML file, without the ``#``."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _config_list(args) -> int:
    from cadenza.config_loading import CONFIG_ROOT

    for title, folder in (("experiments", "experiments"), ("model presets", "models")):
        print(f"{title}:")
        files = sorted((CONFIG_ROOT / folder).glob("*.yaml"))
        width = max(len(f.stem) for f in files)
        for f in files:
            print(f"  {f.stem:<{width}}  {_first_comment(f)}")
    return 0


def _config_show(args) -> int:
    from cadenza.config import load_config, to_yaml

    print(to_yaml(load_config(args.experiment, args.overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cadenza",
        description="JAX-native modeling, PEFT training and fast decoding for language models.")
    parser.add_argument("--version", action="version", version=f"cadenza {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks for user errors")
    parser.add_argument("--compile-cache", metavar="DIR|off", default=None,
                        help="JAX persistent compilation cache folder, or 'off' (default: "
                             "$CADENZA_COMPILE_CACHE, else ~/.cache/cadenza/jax-compile)")
    parser.add_argument("--host-memory", choices=HOST_MEMORY_CHOICES, default=None,
                        help="keep freed host memory mapped for reuse (XLA:CPU's per-step "
                             "buffers stop page-faulting; larger resident size) or release "
                             "it (default: $CADENZA_HOST_MEMORY, else auto: keep on a "
                             "CPU-only machine)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    config = sub.add_parser("config", help="inspect experiment configs")
    config_sub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    show = config_sub.add_parser("show", help="print the resolved config of an experiment")
    show.add_argument("experiment", help="experiment YAML file or shipped experiment name")
    show.add_argument("overrides", nargs="*", metavar="section.field=value",
                      help="overrides applied after the file")
    show.set_defaults(func=_config_show)
    listing = config_sub.add_parser(
        "list", help="the shipped experiments and model presets, one line each")
    listing.set_defaults(func=_config_list)

    for module in AREA_COMMANDS:
        importlib.import_module(module).register(sub)
    _use_defaults_formatter(parser)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv`` as the command line does (argparse exits 2 on an error)."""
    args, extra = parser.parse_known_args(argv)
    # ``section.field=value`` overrides may follow options (``compile EXP --topology T a=b``).
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-")
                                                    for a in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        configure_cli(args.compile_cache, host_memory=args.host_memory)  # before JAX loads
        with disk_errors(f"cadenza {args.command}"):  # full disk, read-only, permissions
            code = args.func(args)
        if argv is None:  # the command line: the process exits next
            gc.freeze()   # its final collection of JAX's object graph took ~0.3 s
        return code
    except CadenzaError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
