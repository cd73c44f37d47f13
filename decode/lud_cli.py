"""``cadenza generate --method lud``: Lexical Unit Decoding from the command line.

A thin layer over :func:`cadenza.decode.lud.lud_generate`, for the generate command
to call once it parses ``--method lud``. Settings come from the model directory's
``lud`` config section (written by the LUD fine-tuning run), overridden by the optional
``args.beta`` / ``args.lookahead`` / ``args.max_new_tokens`` (None = keep).
"""

import dataclasses
import json


def run_lud(args, config, params, prompts, tokenizer) -> int:
    """Decode ``prompts`` (token-id lists) with LUD; print each continuation (``args.json``:
    one JSON object per prompt) and the mean tokens per model call."""
    from cadenza.decode.lud import lud_generate
    from cadenza.models import Transformer

    fields = {f: getattr(args, f, None) for f in ("beta", "lookahead")}
    lud = dataclasses.replace(config.lud, **{k: v for k, v in fields.items() if v is not None})
    max_new = getattr(args, "max_new_tokens", None) or config.decode.max_new_tokens
    eos = tokenizer.eos_id if tokenizer is not None else config.model.eos_token_id
    pad = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
    out = lud_generate(Transformer(config.model), params, prompts, lud, max_new_tokens=max_new,
                       eos_id=eos, pad_id=pad)
    for i in range(len(prompts)):
        ids = out.tokens[i, :int(out.num_tokens[i])].tolist()
        row = {"token_ids": ids, "steps": int(out.steps[i])}
        if tokenizer is not None:
            row["text"] = tokenizer.decode(ids)
        if getattr(args, "json", False):
            print(json.dumps(row))
        else:
            print(f"--- prompt {i} ({len(ids)} tokens in {row['steps']} steps)")
            print(row.get("text", " ".join(map(str, ids))))
    if not getattr(args, "json", False):
        print(f"LUD: {out.tokens_per_step():.2f} tokens per step")
    return 0
