"""``cadenza generate --method superposed``: Superposed Decoding from the command line.

A thin layer over :func:`cadenza.decode.superposed.superposed_generate`. The
n-gram table must have been built with the model's tokenizer (its manifest
records the tokenizer's fingerprint) or byte-level for a byte-level model.
"""

import dataclasses
import json

from cadenza.errors import CadenzaError


def check_table_tokenizer(table, tokenizer) -> None:
    """Fail unless the n-gram table was built with ``tokenizer`` (or both are byte-level)."""
    from cadenza.decode.ngram_table import tokenizer_fingerprint

    made_with = table.manifest.get("tokenizer") or {}
    if tokenizer is None:
        if made_with.get("kind") != "byte-level":
            raise CadenzaError("the n-gram table was built with a tokenizer, but the model "
                               "directory has none", where="--ngram",
                               fix="build the table with --byte-level, or use a model with a "
                                   "tokenizer/ folder")
        return
    expected = tokenizer_fingerprint(tokenizer.directory)
    if made_with.get("sha256") != expected:
        raise CadenzaError(f"the n-gram table was built with another tokenizer "
                           f"({made_with or 'unknown'})", where="--ngram",
                           fix=f"rebuild it: cadenza ngram build --tokenizer "
                               f"{tokenizer.directory} ...")


def run_superposed(args, config, params, prompts, tokenizer) -> int:
    """Decode ``prompts`` (token-id lists) with Superposed Decoding and print the k drafts."""
    from cadenza.decode.ngram_table import load_ngram_table
    from cadenza.decode.superposed import SuperposedConfig, superposed_generate
    from cadenza.models import Transformer

    fields = {"num_drafts": args.k}
    if args.max_new_tokens is not None:
        fields["max_new_tokens"] = args.max_new_tokens
    if args.candidates is not None:
        fields["num_candidates"] = args.candidates
    if args.alpha is not None:
        fields["alpha"] = args.alpha
    if args.temperature is not None:
        fields["temperature"] = args.temperature
    sconfig = dataclasses.replace(SuperposedConfig(), **fields)
    table = None
    if args.ngram:
        table = load_ngram_table(args.ngram)
        check_table_tokenizer(table, tokenizer)
    elif sconfig.alpha > 0:
        raise CadenzaError("superposed decoding interpolates with an n-gram table",
                           where="--ngram", fix="pass --ngram PATH (cadenza ngram build), or "
                                                "--alpha 0 to switch the n-gram off")
    eos = tokenizer.eos_id if tokenizer is not None else config.model.eos_token_id
    pad = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
    out = superposed_generate(Transformer(config.model), params, prompts, table, sconfig,
                              eos_id=eos, pad_id=pad, tokenizer=tokenizer)
    for i in range(len(prompts)):
        drafts = []
        for d in range(sconfig.num_drafts):
            n = int(out.lengths[i, d])
            draft = {"token_ids": out.tokens[i, d, :n].tolist(),
                     "perplexity": float(out.perplexities[i, d]),
                     "finished": bool(out.finished[i, d])}
            if out.texts is not None:
                draft["text"] = out.texts[i][d]
            drafts.append(draft)
        if args.json:
            print(json.dumps({"drafts": drafts}))
        else:
            for d, draft in enumerate(drafts):
                print(f"--- prompt {i}, draft {d} (perplexity {draft['perplexity']:.2f})")
                print(draft.get("text", " ".join(map(str, draft["token_ids"]))))
    return 0
