"""``cadenza convert``: Hugging Face import, export and logit parity check; weight-only
quantisation of a model directory."""

from cadenza.cli import CONVERT_HELP, command_group, json_line


def _quiet_library_notes() -> None:
    """The handlers print the notes themselves; keep the library's log copy off stderr."""
    import logging

    logging.getLogger("cadenza.hf").setLevel(logging.ERROR)


def _import(args) -> int:
    from cadenza.models.hf_check import check_hf
    from cadenza.models.hf_import import import_hf

    _quiet_library_notes()
    out, notes = import_hf(args.hf_dir, args.out_dir, dtype=args.dtype)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote cadenza model directory {out}")
    if args.check:
        return _report(check_hf([args.hf_dir], ref_python=args.ref_python))
    return 0


def _export(args) -> int:
    from cadenza.models.hf_export import save_hf

    out = save_hf(args.ckpt_dir, args.hf_dir, max_shard_bytes=int(args.max_shard_mb * 2**20))
    print(f"wrote Hugging Face checkpoint {out}")
    return 0


def _check(args) -> int:
    from cadenza.models.hf_check import check_hf

    return _report(check_hf(args.hf_dirs, num_prompts=args.prompts, prompt_len=args.length,
                            rtol=args.rtol, kl_tol=args.kl_tol, ref_python=args.ref_python),
                   as_json=args.json, verbose=args.verbose)


def _quantize(args) -> int:
    from cadenza.models.checkpoint import load_model, save_model, tokenizer_dir
    from cadenza.models.quant import count_quantized, quantize_model

    config, params = load_model(args.checkpoint)
    config, params = quantize_model(config, params, args.scheme, args.targets, args.group)
    out = save_model(args.out, config, params, tokenizer_dir(args.checkpoint))
    print(f"wrote {args.scheme} model directory {out} ({count_quantized(params)} projection "
          f"sites quantised, targets {config.model.weight_quant_targets!r})")
    return 0


def _report(reports, as_json: bool = False, verbose: bool = False) -> int:
    for r in reports:
        print(json_line(r, passed=r.passed) if as_json else r.format(verbose))
    return 0 if all(r.passed for r in reports) else 1


def register(subparsers) -> None:
    """Add ``convert hf-import``, ``convert hf-export``, ``convert check`` and
    ``convert quantize``."""
    sub = command_group(subparsers, "convert", CONVERT_HELP)

    imp = sub.add_parser("hf-import", help="HF config.json + safetensors -> cadenza model dir")
    imp.add_argument("hf_dir", help="directory with config.json and *.safetensors")
    imp.add_argument("out_dir", help="new cadenza model directory")
    imp.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                     help="param dtype (default: the checkpoint's)")
    imp.add_argument("--check", action="store_true",
                     help="afterwards compare logits with transformers (needs the reference env)")
    imp.add_argument("--ref-python", default=None, help="Python of the reference env")
    imp.set_defaults(func=_import)

    exp = sub.add_parser("hf-export", help="cadenza model dir -> HF config.json + safetensors")
    exp.add_argument("ckpt_dir", help="cadenza model directory (config.yaml and its params)")
    exp.add_argument("hf_dir", help="new Hugging Face checkpoint directory")
    exp.add_argument("--max-shard-mb", type=float, default=5 * 1024,
                     help="split safetensors files above this size (MiB)")
    exp.set_defaults(func=_export)

    chk = sub.add_parser("check", help="max |logit diff| and KL vs transformers, per prompt")
    chk.add_argument("hf_dirs", nargs="+", metavar="HF_DIR", help="HF checkpoint directories")
    chk.add_argument("--prompts", type=int, default=3, help="number of random prompts")
    chk.add_argument("--length", type=int, default=16, help="tokens per prompt")
    chk.add_argument("--rtol", type=float, default=1e-4,
                     help="max |logit diff| allowed, relative to the logit scale")
    chk.add_argument("--kl-tol", type=float, default=1e-6, help="max KL allowed per position")
    chk.add_argument("--ref-python", default=None, help="Python of the reference env")
    chk.add_argument("--json", action="store_true",
                     help="one JSON object per checkpoint (per-position diffs and KL, verdict)")
    chk.add_argument("--verbose", action="store_true",
                     help="print every position's diff, KL and top-1 agreement (default: one "
                          "line per prompt, its worst position)")
    chk.set_defaults(func=_check)

    qua = sub.add_parser("quantize", help="cadenza model dir -> weight-only quantised model dir")
    qua.add_argument("--checkpoint", required=True, metavar="DIR",
                     help="float cadenza model directory (or Hugging Face folder)")
    qua.add_argument("--scheme", required=True, choices=("int8", "int4", "nf4"),
                     help="int8 per output channel, int4 in groups of --group inputs, "
                          "nf4 blockwise (64)")
    qua.add_argument("--targets", metavar="REGEX", default=None,
                     help="projections to quantise, re.fullmatch on module paths such as "
                          "layers.attn.q_proj or lm_head (default: every projection but "
                          "lm_head; '.*' for all)")
    qua.add_argument("--group", type=int, default=None, help="int4 group size (default 128)")
    qua.add_argument("--out", required=True, metavar="DIR", help="new model directory")
    qua.set_defaults(func=_quantize)
