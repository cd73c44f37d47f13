"""``cadenza ngram build``: count n-grams of a text corpus into a memory-mapped table."""

import argparse
import sys


def _build(args) -> int:
    import pathlib

    from cadenza.decode.ngram_table import build_from_files, corpus_files, tokenizer_fingerprint

    tokenizer = tokenizer_id = None
    if args.tokenizer:
        from cadenza.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        tokenizer_id = {"kind": "dir", "path": str(pathlib.Path(args.tokenizer).resolve()),
                        "sha256": tokenizer_fingerprint(args.tokenizer),
                        "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                        "eos_id": tokenizer.eos_id}
    files = corpus_files(args.input)   # a missing input is an error before any progress
    print(f"counting n-grams (orders up to {args.max_order}) of {len(files)} file(s) ...",
          file=sys.stderr, flush=True)
    from cadenza.outputs import atomic_dir  # an old table is replaced only when whole

    with atomic_dir(args.out, replace=(pathlib.Path(args.out) / "manifest.json").is_file()) as tmp:
        manifest = build_from_files(args.input, tmp, tokenizer=tokenizer,
                                    tokenizer_id=tokenizer_id, max_order=args.max_order,
                                    add_bos=not args.no_bos, add_eos=not args.no_eos,
                                    doc_per_line=args.doc_per_line)
    corpus = manifest["corpus"]
    print(f"n-gram table (orders {manifest['orders'][0]}..{manifest['max_order']}) -> {args.out}: "
          f"{corpus['documents']} documents, {corpus['tokens']} tokens, "
          f"{manifest['entries']['contexts']} contexts, {manifest['entries']['pairs']} pairs; "
          f"{len(corpus['skipped_files'])} files skipped (not UTF-8)")
    return 0


def register(subparsers) -> None:
    ngram = subparsers.add_parser("ngram", help="n-gram tables for Superposed Decoding")
    sub = ngram.add_subparsers(dest="ngram_command", metavar="SUBCOMMAND")
    build = sub.add_parser(
        "build", help="count 2..N-grams of text files into a memory-mapped table",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_DIR",
                       help="text files, or directories read recursively; one document per file")
    which = build.add_mutually_exclusive_group(required=True)
    which.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (load_tokenizer)")
    which.add_argument("--byte-level", action="store_true",
                       help="byte ids + 3 (0 pad, 1 BOS, 2 EOS)")
    build.add_argument("--out", required=True, metavar="DIR", help="table directory to write")
    build.add_argument("--max-order", type=int, default=6, help="highest n-gram order (2..8)")
    build.add_argument("--no-bos", action="store_true", help="do not start documents with BOS")
    build.add_argument("--no-eos", action="store_true", help="do not end documents with EOS")
    build.add_argument("--doc-per-line", action="store_true",
                       help="each non-empty line is a document")
    build.set_defaults(func=_build)
