"""``cadenza generate``: decode from a cadenza model directory (a thin layer over
:func:`cadenza.decode.generate`).

Prompts come from ``--prompt TEXT`` (repeatable), ``--prompts-file`` (one
prompt per line) or ``--prompt-ids 5,17,42`` (repeatable; works without a
tokenizer). Sampling flags override the checkpoint config's ``decode``
section. Output: each prompt's text (or ids) and the stats, or with
``--json`` one JSON object per prompt: ``token_ids`` (generated, prompt
excluded), ``text`` (with a tokenizer), ``logprobs``, ``finish_reason``,
``stats``.
"""

import dataclasses
import json
import pathlib
import sys

from cadenza.errors import CadenzaError

# flags that set the DecodeConfig field of the same name when given
_CONFIG_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p",
                 "repetition_penalty", "seed", "max_len", "chunk_steps", "proxy_alpha", "draft",
                 "gamma", "accept_head", "heads")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text from a model directory",
        description="Decode continuations of prompts with a cadenza model directory.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="model directory (config.yaml, params/, optional tokenizer/)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a text prompt")
    src.add_argument("--prompts-file", metavar="FILE",
                     help="text prompts, one per line (empty lines are an error)")
    src.add_argument("--prompt-ids", action="append", metavar="IDS",
                     help="a prompt as comma-separated token ids, e.g. 5,17,42")
    p.add_argument("--chat", action="store_true",
                   help="wrap each text prompt as a user turn in the tokenizer's chat template")
    p.add_argument("--method",
                   choices=["greedy", "sample", "speculative", "ngram", "medusa", "superposed",
                            "lud"],
                   help="speculative: draft model (--draft); ngram: prompt lookup; medusa: "
                        "trained heads and a token tree (--heads); all three are lossless "
                        "(greedy unless --sample). superposed: k drafts from one "
                        "stream (needs --ngram unless --alpha 0); lud: lexical units in "
                        "parallel (a LUD-fine-tuned model)")
    p.add_argument("--draft", metavar="DIR", help="draft model directory (--method speculative)")
    p.add_argument("--gamma", type=int, help="draft tokens per round (the maximum if adaptive)")
    p.add_argument("--adaptive", action="store_true",
                   help="adaptive draft length: SpecDec++ head with --accept-head, else the "
                        "draft's confidence")
    p.add_argument("--accept-head", metavar="DIR",
                   help="trained SpecDec++ head directory (cadenza train, train.task=specdec)")
    p.add_argument("--heads", metavar="DIR",
                   help="trained Medusa head directory (cadenza train, train.task=medusa)")
    p.add_argument("--sample", action="store_true",
                   help="with --method speculative/ngram/medusa: exact speculative sampling")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int, help="0 = off")
    p.add_argument("--top-p", type=float, help="in (0, 1]; 1 = off")
    p.add_argument("--min-p", type=float, help="in [0, 1); 0 = off")
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, help="row i uses seed + i")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--stop-token-id", action="append", type=int, metavar="ID",
                   help="stop token id (repeatable), besides EOS")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    p.add_argument("--max-len", type=int, help="KV-cache slots per row (default: as needed)")
    p.add_argument("--stream", action="store_true",
                   help="print text as it is generated (one prompt only)")
    p.add_argument("--chunk-steps", type=int, help="decode steps per host sync when streaming")
    p.add_argument("--proxy-expert", metavar="DIR", help="proxy-tuning: small tuned model")
    p.add_argument("--proxy-anti", metavar="DIR", help="proxy-tuning: small untuned model")
    p.add_argument("--proxy-alpha", type=float, help="proxy-tuning weight (default 1)")
    sp = p.add_argument_group("superposed decoding (--method superposed)")
    sp.add_argument("--k", type=int, default=3, help="number of drafts (default 3)")
    sp.add_argument("--ngram", metavar="PATH", help="n-gram table from `cadenza ngram build`")
    sp.add_argument("--candidates", type=int, help="top-C candidates per step (default 9)")
    sp.add_argument("--alpha", type=float, help="n-gram interpolation weight (default 0.54)")
    lu = p.add_argument_group("lexical unit decoding (--method lud)")
    lu.add_argument("--beta", type=float, help="placeholder acceptance threshold "
                                               "(default: the model's lud.beta)")
    lu.add_argument("--lookahead", type=int, help="placeholders per step (default: lud.lookahead)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.set_defaults(func=_generate)


def _load_tokenizer(directory):
    """The model directory's tokenizer, or None (no tokenizer/ folder or no loader)."""
    from cadenza.models.checkpoint import tokenizer_dir

    tdir = tokenizer_dir(directory)
    if tdir is None:
        return None, f"{directory} has no tokenizer/ folder"
    try:
        from cadenza.models.tokenizer import load_tokenizer
    except ImportError:
        return None, "cadenza.models.tokenizer is not available in this installation"
    return load_tokenizer(tdir), None


def _prompts(args, tokenizer, why_none):
    if args.prompt_ids:
        if args.chat:
            raise CadenzaError("--chat needs text prompts", where="--prompt-ids",
                               fix="use --prompt, or drop --chat")
        out = []
        for s in args.prompt_ids:
            try:
                out.append([int(t) for t in s.split(",") if t.strip()])
            except ValueError:
                raise CadenzaError(f"not a comma-separated list of token ids: {s!r}",
                                   where="--prompt-ids", fix="e.g. --prompt-ids 5,17,42") from None
        return out
    if args.prompt:
        texts = args.prompt
    else:
        path = pathlib.Path(args.prompts_file)
        if not path.is_file():
            raise CadenzaError("no such file", where=str(path), fix="give a text file")
        texts = path.read_text().splitlines()
        empty = [i + 1 for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise CadenzaError(f"empty prompt lines {empty[:10]}", where=str(path),
                               fix="remove empty lines (one prompt per line)")
    if tokenizer is None:
        raise CadenzaError(f"text prompts need a tokenizer, but {why_none}",
                           where="--checkpoint", fix="use --prompt-ids with token ids")
    if args.chat:
        try:
            from cadenza.models.chat_template import ChatTemplate
        except ImportError:
            raise CadenzaError("chat templates are not available in this installation "
                               "(cadenza.models.chat_template is missing)", where="--chat",
                               fix="drop --chat and write the prompt in the model's format"
                               ) from None
        template = ChatTemplate.from_tokenizer(tokenizer)
        texts = [template.render([{"role": "user", "content": t}], add_generation_prompt=True)
                 for t in texts]
    return [tokenizer.encode(t, add_bos=True) for t in texts]


def _chat_stop_ids(tokenizer) -> list[int]:
    """Ids of the chat template's end-of-turn tokens that the tokenizer has."""
    from cadenza.models.chat_template import ChatTemplate

    ids = (tokenizer.token_to_id(t) for t in ChatTemplate.from_tokenizer(tokenizer).end_of_turn)
    return [i for i in ids if i is not None]


def _decode_config(base, args, tokenizer):
    fields = {f: getattr(args, f) for f in _CONFIG_FLAGS if getattr(args, f) is not None}
    if args.method in ("greedy", "sample"):
        fields["method"] = args.method
    elif args.method is not None:
        fields["speculative"] = "draft" if args.method == "speculative" else args.method
        fields["method"] = "sample" if args.sample else "greedy"
        if args.adaptive:
            fields["adaptive"] = "head" if args.accept_head else "confidence"
    if args.stop:
        fields["stop"] = list(base.stop) + args.stop
    stop_ids = list(base.stop_token_ids) + list(args.stop_token_id or [])
    if args.chat and tokenizer is not None:
        stop_ids += _chat_stop_ids(tokenizer)
    fields["stop_token_ids"] = sorted(set(stop_ids))
    if args.ignore_eos:
        fields["ignore_eos"] = True
    return dataclasses.replace(base, **fields)


def _generate(args) -> int:
    from cadenza.decode.loop import ProxyTuning, generate, stream
    from cadenza.models import Transformer, load_model

    config, params = load_model(args.checkpoint)
    tokenizer, why_none = _load_tokenizer(args.checkpoint)
    prompts = _prompts(args, tokenizer, why_none)
    if args.method == "superposed":
        from cadenza.decode.superposed_cli import run_superposed

        return run_superposed(args, config, params, prompts, tokenizer)
    if args.method == "lud":
        from cadenza.decode.lud_cli import run_lud

        return run_lud(args, config, params, prompts, tokenizer)
    decode_config = _decode_config(config.decode, args, tokenizer)
    proxy = None
    if args.proxy_expert or args.proxy_anti:
        if not (args.proxy_expert and args.proxy_anti):
            raise CadenzaError("proxy-tuning needs both --proxy-expert and --proxy-anti",
                               where="--proxy-expert/--proxy-anti", fix="give both directories")
        (ecfg, eparams), (acfg, aparams) = (load_model(args.proxy_expert),
                                            load_model(args.proxy_anti))
        proxy = ProxyTuning(Transformer(ecfg.model), eparams, Transformer(acfg.model), aparams)
    model = Transformer(config.model)
    kwargs = dict(tokenizer=tokenizer, proxy=proxy)
    if decode_config.speculative != "none":
        result = _speculative(model, params, prompts, decode_config, tokenizer, args)
    elif args.stream:
        if len(prompts) != 1:
            raise CadenzaError("--stream takes exactly one prompt", where="--stream",
                               fix="give one prompt, or drop --stream")
        result = None
        for chunk in stream(model, params, prompts, decode_config, **kwargs):
            if not args.json:
                print(chunk.text[0] if chunk.text else " ".join(map(str, chunk.token_ids[0])),
                      end="" if chunk.text else " ", flush=True)
            result = chunk.result
        if not args.json:
            print()
    else:
        result = generate(model, params, prompts, decode_config, **kwargs)
    _print(result, args.json, show_text=not args.stream)
    return 0


def _speculative(model, params, prompts, config, tokenizer, args):
    from cadenza.decode.medusa import load_medusa_heads
    from cadenza.decode.specdec_head import load_accept_head
    from cadenza.decode.speculative import (
        check_draft_vocab,
        drafter_from_config,
        speculative_generate,
    )
    from cadenza.models import Transformer, load_model

    if args.stream or args.proxy_expert or args.proxy_anti:
        raise CadenzaError("speculative decoding does not combine with --stream or proxy-tuning",
                           where="--method", fix="drop --stream / --proxy-*")
    if config.speculative == "medusa":
        drafter, heads = load_medusa_heads(config.heads, model.config)
        return speculative_generate(model, params, prompts, config, drafter=drafter,
                                    draft_params=heads, tokenizer=tokenizer)
    draft_params, draft_config, blocks = None, None, 3
    if config.speculative == "draft":
        dcfg, dparams = load_model(config.draft)
        draft_config = dcfg.model
        check_draft_vocab(model, Transformer(draft_config))
        head = None
        if config.adaptive == "head":
            head, blocks = load_accept_head(config.accept_head, draft_config)
        draft_params = (dparams, head)
    return speculative_generate(model, params, prompts, config,
                                drafter=drafter_from_config(config, draft_config, blocks),
                                draft_params=draft_params, tokenizer=tokenizer)


def _print(result, as_json: bool, show_text: bool) -> None:
    for i, ids in enumerate(result.token_ids):
        row = {"token_ids": ids, "finish_reason": result.finish_reasons[i],
               "logprobs": result.logprobs[i], "stats": result.stats}
        if result.text is not None:
            row["text"] = result.text[i]
        if as_json:
            print(json.dumps(row))
        elif show_text:
            print(f"--- prompt {i} ({result.finish_reasons[i]}, {len(ids)} tokens)")
            print(row.get("text", " ".join(map(str, ids))))
    if not as_json:
        s = result.stats
        print(f"[prefill {s['prefill_s'] * 1e3:.1f} ms, decode {s['decode_tokens_per_s']:.1f} "
              f"tokens/s over {s['steps']} steps, compile {s['compile_s']:.1f} s]",
              file=sys.stderr)
