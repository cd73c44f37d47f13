"""``cadenza convert merge`` (merge fine-tunes of one base) and ``cadenza convert bitdelta``
(store a fine-tune as signs and scales against its base).

Joins the shared ``convert`` command (:func:`cadenza.cli.command_group`).
"""

from cadenza.cli import CONVERT_HELP, command_group


def _merge(args) -> int:
    import jax

    from cadenza.train.merge import MergeSpec, check_inputs, merge_models
    from cadenza.train.mesh import make_mesh

    spec = MergeSpec(method=args.method, weights=tuple(args.weights) if args.weights else None,
                     lam=args.lam, density=args.density, drop_rate=args.drop_rate,
                     rescale=args.rescale, top=args.top, bottom=args.bottom,
                     alpha=args.alpha, seed=args.seed)
    spec.check_count(len(args.models))
    base_config, _ = check_inputs(args.base, args.models)
    mesh = None
    if jax.device_count() > 1:
        mesh = make_mesh(base_config.mesh)
    record = merge_models(args.base, args.models, args.out, spec, mesh=mesh, progress=print)
    settings = ", ".join(f"{k}={v}" for k, v in record.items()
                         if k not in ("cadenza", "base", "models", "method", "model_stock_t"))
    print(f"merged {len(args.models)} models into {args.out} ({args.method}: {settings})")
    return 0


def _bitdelta(args) -> int:
    from cadenza.train.bitdelta import compress_models

    record = compress_models(args.base, args.model, args.out, progress=print)
    ratio = record["model_bytes"] / max(record["bytes"], 1)
    print(f"wrote {args.out}: {record['bytes']:,} bytes for a {record['model_bytes']:,}-byte "
          f"model ({ratio:.1f}x smaller; {len(record['compressed'])} params as signs + "
          f"scales, {len(record['exact'])} exact). Apply it: cadenza convert merge --base "
          f"{args.base} --models {args.out} --method linear --out DIR")
    return 0


def register(subparsers) -> None:
    """Add ``convert merge`` and ``convert bitdelta``."""
    sub = command_group(subparsers, "convert", CONVERT_HELP)
    p = sub.add_parser(
        "merge", help="merge fine-tunes of one base (soups, task arithmetic, TIES, DARE, ...)",
        description="Merge fine-tuned model directories, Hugging Face folders, LoRA-family "
                    "adapter directories or BitDelta directories made from one --base into "
                    "a new model directory (with merge.json). "
                    "Options a method does not use are refused.")
    p.add_argument("--base", required=True,
                   help="the base model directory or Hugging Face folder")
    p.add_argument("--models", required=True, nargs="+", metavar="DIR",
                   help="fine-tuned model directories, Hugging Face folders, adapter "
                        "directories or BitDelta directories of the base")
    p.add_argument("--method", required=True,
                   help="linear | task_arithmetic | ties | dare_linear | dare_ties | breadcrumbs "
                        "| model_stock | wise_ft")
    p.add_argument("--out", required=True, help="new model directory (must not exist)")
    p.add_argument("--weights", type=float, nargs="+", metavar="W",
                   help="one weight per model (default: all 1)")
    p.add_argument("--lambda", dest="lam", type=float,
                   help="scale of the merged task vector (default 1)")
    p.add_argument("--density", type=float, help="ties: fraction of each delta kept (default 0.2)")
    p.add_argument("--drop-rate", type=float,
                   help="dare_*: probability p of dropping each delta entry (default 0.9)")
    p.add_argument("--rescale", type=float,
                   help="dare_*: scale of kept entries (default 1/(1-p); DAREx: a fixed value)")
    p.add_argument("--top", type=float,
                   help="breadcrumbs: fraction of largest magnitudes dropped (default 0.01)")
    p.add_argument("--bottom", type=float,
                   help="breadcrumbs: fraction of smallest magnitudes dropped (default 0.9)")
    p.add_argument("--alpha", type=float, help="wise_ft: weight of the fine-tune (default 0.5)")
    p.add_argument("--seed", type=int, help="dare_*: seed of the random masks (default 0)")
    p.set_defaults(func=_merge)
    b = sub.add_parser(
        "bitdelta", help="store a fine-tune as one bit per weight against its base (BitDelta)",
        description="Write a BitDelta directory: the sign of each layer matrix's delta to "
                    "--base and one scale (mean |delta|) per matrix; other params exact. "
                    "Use it as a 'convert merge' input to rebuild or merge the fine-tune.")
    b.add_argument("--base", required=True,
                   help="the base model directory or Hugging Face folder")
    b.add_argument("--model", required=True,
                   help="the fine-tuned model directory or Hugging Face folder")
    b.add_argument("--out", required=True, help="new BitDelta directory (must not exist)")
    b.set_defaults(func=_bitdelta)
