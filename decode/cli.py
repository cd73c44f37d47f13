"""``cadenza generate``: decode from a cadenza model directory (a thin layer over
:func:`cadenza.decode.generate`).

Prompts come from ``--prompt TEXT`` (repeatable), ``--prompts-file`` (one
prompt per line) or ``--prompt-ids 5,17,42`` (repeatable; works without a
tokenizer). ``--method`` picks a method of the registry
(:mod:`cadenza.decode.registry`); flags override the checkpoint config's
``decode`` section (and ``lud`` for --beta/--lookahead). Each method takes the
shared flags plus the ones its registry entry declares; any other flag is
refused (exit 2), as is --stream with --json. Output: each prompt's text (or
ids) and the stats, or with ``--json`` one JSON object per prompt:
``token_ids`` (generated, prompt excluded), ``text`` (with a tokenizer),
``logprobs``, ``finish_reason``, ``stats`` (``import_s``: importing JAX and the decoder,
``load_s``: reading the model, ``compile_s``, ``prefill_s``, ``decode_s``, ...) and the
method's per-prompt extras
(superposed: ``drafts``; lud: ``steps``). Non-finite numbers print as null.
"""

import argparse
import dataclasses
import json
import math
import pathlib
import re
import sys
import time

from cadenza.errors import CadenzaError


def register(subparsers) -> None:
    from cadenza.decode.registry import REGISTRY

    p = subparsers.add_parser(
        "generate", help="generate text from a model directory",
        description="Decode continuations of prompts with a cadenza model directory. Each "
                    "--method takes the shared flags plus its own; a flag the chosen method "
                    "does not use is an error.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="model directory (config.yaml, params, optional tokenizer/) "
                        "or Hugging Face folder (config.json, *.safetensors)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a text prompt")
    src.add_argument("--prompts-file", metavar="FILE",
                     help="text prompts, one per line (empty lines are an error)")
    src.add_argument("--prompt-ids", action="append", metavar="IDS",
                     help="a prompt as comma-separated token ids, e.g. 5,17,42")
    p.add_argument("--adapter", metavar="DIR",
                   help="decode through a cadenza adapter directory on this base model "
                        "(every adapter method, prefix and prompt tuning included)")
    add_quantize_flags(p, kv_default=None)
    p.add_argument("--chat", action="store_true",
                   help="wrap each text prompt as a user turn in the tokenizer's chat template")
    p.add_argument("--method", choices=list(REGISTRY),
                   help="; ".join(f"{e.name}: {e.summary}" for e in REGISTRY.values())
                   + " (default: the model's decode.method)")
    p.add_argument("--max-new-tokens", type=int,
                   help="tokens to generate per prompt (default: the model's decode section, 64)")
    p.add_argument("--seed", type=int, help="row i uses seed + i")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop string (repeatable); escapes \\n \\t \\r \\\\ \\xHH \\uHHHH "
                        "are decoded, so --stop '\\n\\n' stops at a blank line")
    p.add_argument("--stop-token-id", action="append", type=int, metavar="ID",
                   help="stop token id (repeatable), besides EOS")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    p.add_argument("--max-len", type=int, help="KV-cache slots per row (default: as needed)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    sa = p.add_argument_group("sampling (--method sample; speculative methods with --sample)")
    sa.add_argument("--temperature", type=float,
                    help="softmax temperature (also --method superposed's)")
    sa.add_argument("--top-k", type=int, help="0 = off")
    sa.add_argument("--top-p", type=float, help="in (0, 1]; 1 = off")
    sa.add_argument("--min-p", type=float, help="in [0, 1); 0 = off")
    sa.add_argument("--repetition-penalty", type=float, help="1 = off (greedy too)")
    pl = p.add_argument_group("greedy and sample")
    pl.add_argument("--stream", action="store_true",
                    help="print text as it is generated (one prompt only; not with --json)")
    pl.add_argument("--chunk-steps", type=int, help="decode steps per host sync when streaming")
    pl.add_argument("--proxy-expert", metavar="DIR", help="proxy-tuning: small tuned model")
    pl.add_argument("--proxy-anti", metavar="DIR", help="proxy-tuning: small untuned model")
    pl.add_argument("--proxy-alpha", type=float, help="proxy-tuning weight (default 1)")
    sp = p.add_argument_group("speculative methods (speculative, ngram, medusa, hydra, "
                              "recycling, layer_skip; all lossless)")
    sp.add_argument("--sample", action="store_true", help="exact speculative sampling")
    sp.add_argument("--draft", metavar="DIR", help="draft model directory (speculative)")
    sp.add_argument("--gamma", type=int,
                    help="draft tokens per round (the maximum if adaptive; speculative, ngram)")
    sp.add_argument("--adaptive", action="store_true",
                    help="adaptive draft length: SpecDec++ head with --accept-head, else the "
                         "draft's confidence")
    sp.add_argument("--accept-head", metavar="DIR",
                    help="trained SpecDec++ head directory (cadenza train, train.task=specdec)")
    sp.add_argument("--heads", metavar="DIR",
                    help="trained Medusa / Hydra head directory (cadenza train, "
                         "train.task=medusa / hydra)")
    tr = p.add_argument_group("token recycling (--method recycling)")
    tr.add_argument("--successors", type=int, help="successors kept per token (default 8)")
    tr.add_argument("--tree-nodes", type=int, help="draft tree nodes (default 4)")
    tr.add_argument("--tree-depth", type=int, help="draft tree depth (default 3)")
    ls = p.add_argument_group("layer-skip self-speculation (--method layer_skip)")
    ls.add_argument("--skip-layers", type=_layer_list, metavar="I,J,..",
                    help="layers the draft skips, e.g. 2,3,5 (cadenza layer-skip search "
                         "finds a set)")
    ls.add_argument("--search-skip", type=int, metavar="N",
                    help="first search the N layers to skip that keep the most accepted "
                         "tokens per forward on these prompts (greedy; printed to stderr), "
                         "then decode with them")
    ls.add_argument("--stop-threshold", type=float,
                    help="stop drafting once 1 - prod(draft confidence) exceeds it "
                         "(default 0.5; 1 = always --gamma drafts)")
    su = p.add_argument_group("superposed decoding (--method superposed)")
    su.add_argument("--k", type=int, help="number of drafts (default 3)")
    su.add_argument("--ngram", metavar="PATH", help="n-gram table from `cadenza ngram build`")
    su.add_argument("--candidates", type=int, help="top-C candidates per step (default 9)")
    su.add_argument("--alpha", type=float, help="n-gram interpolation weight (default 0.54)")
    lu = p.add_argument_group("lexical unit decoding (--method lud)")
    lu.add_argument("--beta", type=float, help="placeholder acceptance threshold "
                                               "(default: the model's lud.beta)")
    lu.add_argument("--lookahead", type=int, help="placeholders per step (default: lud.lookahead)")
    p.set_defaults(func=_generate)


def _layer_list(text: str) -> list[int]:
    """``--skip-layers``: comma-separated layer indices (empty: none)."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of layer indices: {text!r} (e.g. 2,3,5)") from None


def model_tokenizer(directory):
    """The model directory's tokenizer, or None (no tokenizer/ folder or no loader)."""
    from cadenza.models.checkpoint import tokenizer_dir

    tdir = tokenizer_dir(directory)
    if tdir is None:
        return None, f"{directory} has no tokenizer/ folder"
    try:
        from cadenza.models.tokenizer import load_tokenizer
    except ImportError:
        return None, "cadenza.models.tokenizer is not available in this installation"
    try:
        return load_tokenizer(tdir), None
    except CadenzaError as e:  # only text prompts and text output need it
        return None, f"its tokenizer does not load ({e})"


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
        from cadenza.inputs import read_text  # a clear error for a non-UTF-8 file

        texts = read_text(path, "prompts file").splitlines()
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


_ESCAPE = re.compile(r"\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|[ntr\\])")
_SIMPLE_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r", "\\\\": "\\"}


def unescape(text: str) -> str:
    """``text`` with the escapes \\n \\t \\r \\\\ \\xHH \\uHHHH decoded (a shell passes them
    literally); any other backslash stays as it is."""
    return _ESCAPE.sub(lambda m: _SIMPLE_ESCAPES.get(m[0]) or chr(int(m[0][2:], 16)), text)


def chat_stop_ids(tokenizer) -> list[int]:
    """Ids of the chat template's end-of-turn tokens that the tokenizer has."""
    from cadenza.models.chat_template import ChatTemplate

    ids = (tokenizer.token_to_id(t) for t in ChatTemplate.from_tokenizer(tokenizer).end_of_turn)
    return [i for i in ids if i is not None]


# flag -> (decode section or None, field); superposed reads --temperature into its section
_FIELDS = {
    "--max-new-tokens": (None, "max_new_tokens"), "--seed": (None, "seed"),
    "--max-len": (None, "max_len"), "--chunk-steps": (None, "chunk_steps"),
    "--kv-cache": (None, "kv_cache"),
    "--temperature": ("sampling", "temperature"), "--top-k": ("sampling", "top_k"),
    "--top-p": ("sampling", "top_p"), "--min-p": ("sampling", "min_p"),
    "--repetition-penalty": ("sampling", "repetition_penalty"),
    "--proxy-expert": ("proxy", "expert"), "--proxy-anti": ("proxy", "anti"),
    "--proxy-alpha": ("proxy", "alpha"), "--sample": ("speculative", "sample"),
    "--draft": ("speculative", "draft"), "--gamma": ("speculative", "gamma"),
    "--accept-head": ("speculative", "accept_head"), "--heads": ("medusa", "heads"),
    "--successors": ("recycling", "k"), "--tree-nodes": ("recycling", "nodes"),
    "--tree-depth": ("recycling", "depth"),
    "--skip-layers": ("layer_skip", "skip_layers"),
    "--stop-threshold": ("layer_skip", "threshold"),
    "--k": ("superposed", "num_drafts"), "--ngram": ("superposed", "table"),
    "--candidates": ("superposed", "num_candidates"), "--alpha": ("superposed", "alpha"),
}


def _given(args) -> list[str]:
    """The method-specific and shared flags the user gave (not the prompt sources)."""
    out = []
    for action_flag in list(_FIELDS) + ["--stop", "--stop-token-id", "--ignore-eos", "--json",
                                        "--chat", "--stream", "--adaptive", "--beta",
                                        "--lookahead", "--quantize", "--quantize-targets",
                                        "--search-skip"]:
        v = getattr(args, action_flag[2:].replace("-", "_"))
        if v is not None and v is not False:
            out.append(action_flag)
    return out


def check_flags(method: str, given: list[str]) -> None:
    """Refuse flags that ``method`` does not take (from the registry), and --stream with
    --json, naming the methods that do take the flag."""
    from cadenza.decode.registry import REGISTRY, SHARED_FLAGS

    allowed = set(SHARED_FLAGS) | set(REGISTRY[method].flags)
    for flag in given:
        if flag not in allowed:
            users = [e.name for e in REGISTRY.values() if flag in e.flags]
            raise CadenzaError(f"{flag} does not apply to --method {method}",
                               where=flag, fix=f"drop {flag}, or use --method "
                                               f"{' / '.join(users)}")
    if "--stream" in given and "--json" in given:
        raise CadenzaError("--stream prints text as it comes; --json prints one object per "
                           "prompt at the end", where="--stream",
                           fix="drop --stream or --json")


def _decode_config(base, args, tokenizer):
    from cadenza.decode.config import with_fields

    method = args.method or base.method
    fields = {"method": method}
    for flag, (section, name) in _FIELDS.items():
        v = getattr(args, flag[2:].replace("-", "_"))
        if v is None or v is False:
            continue
        if flag == "--temperature" and method == "superposed":
            section = "superposed"
        fields[f"{section}__{name}" if section else name] = v
    if args.adaptive:
        fields["speculative__adaptive"] = "head" if args.accept_head else "confidence"
    if args.stop:
        fields["stop"] = list(base.stop) + [unescape(s) for s in args.stop]
    stop_ids = list(base.stop_token_ids) + list(args.stop_token_id or [])
    if args.chat and tokenizer is not None:
        stop_ids += chat_stop_ids(tokenizer)
    fields["stop_token_ids"] = sorted(set(stop_ids))
    if args.ignore_eos:
        fields["ignore_eos"] = True
    return with_fields(base, **fields)


def _generate(args) -> int:
    started = time.perf_counter()
    from cadenza.decode.config import with_fields
    from cadenza.decode.registry import generate, stream
    from cadenza.models import Transformer, load_model

    imported = time.perf_counter()
    config, params = load_model(args.checkpoint)
    method = args.method or config.decode.method
    check_flags(method, _given(args))
    config, params = _quantized(args, config, params)
    tokenizer, why_none = model_tokenizer(args.checkpoint)
    startup = {"import_s": imported - started, "load_s": time.perf_counter() - imported}
    prompts = _prompts(args, tokenizer, why_none)
    decode_config = _decode_config(config.decode, args, tokenizer)
    lud = dataclasses.replace(config.lud, **{k: getattr(args, k) for k in ("beta", "lookahead")
                                             if getattr(args, k) is not None})
    kwargs = dict(tokenizer=tokenizer, lud=lud)
    model = Transformer(config.model)
    if args.adapter:
        from cadenza.train.peft.artifacts import load_adapters

        model, trainable = load_adapters(args.adapter, config)
        params = (trainable, model.freeze(params))
    if args.search_skip is not None:
        from cadenza.decode.layer_skip import search_skip_set

        skip, _ = search_skip_set(model, params, prompts, decode_config, args.search_skip,
                                  tokenizer=tokenizer,
                                  report=lambda line: print(line, file=sys.stderr, flush=True))
        print(f"best: --skip-layers {','.join(map(str, skip))}", file=sys.stderr, flush=True)
        decode_config = with_fields(decode_config, layer_skip__skip_layers=list(skip))
    if args.stream:
        if len(prompts) != 1:
            raise CadenzaError("--stream takes exactly one prompt", where="--stream",
                               fix="give one prompt, or drop --stream")
        result = None
        for chunk in stream(model, params, prompts, decode_config, **kwargs):
            print(chunk.text[0] if chunk.text else " ".join(map(str, chunk.token_ids[0])),
                  end="" if chunk.text else " ", flush=True)
            result = chunk.result
        print()
    else:
        result = generate(model, params, prompts, decode_config, **kwargs)
    result.stats.update(startup)  # with compile_s, prefill_s, decode_s: where the time went
    _print(result, args.json, show_text=not args.stream)
    return 0


def add_quantize_flags(p, kv_default: str | None) -> None:
    """``--quantize``, ``--quantize-targets`` and ``--kv-cache`` (``cadenza generate`` and
    ``cadenza serve``); ``kv_default``: ``--kv-cache``'s default (None: the model's
    ``decode.kv_cache``)."""
    p.add_argument("--quantize", choices=("int8", "int4", "nf4"),
                   help="weight-only quantisation of the model's projections before decoding "
                        "(int8 per channel, int4 in groups of 128, nf4 blockwise)")
    p.add_argument("--quantize-targets", metavar="REGEX",
                   help="with --quantize: projections to quantise, re.fullmatch on module "
                        "paths such as layers.attn.q_proj or lm_head (default: every "
                        "projection but lm_head; '.*' for all)")
    p.add_argument("--kv-cache", choices=("auto", "int8"), default=kv_default,
                   help="KV-cache storage: auto = the compute dtype, int8 = int8 with "
                        "per-token, per-head scales (default: "
                        + (kv_default or "the model's decode.kv_cache") + ")")


def _quantized(args, config, params):
    """The loaded model with ``--quantize`` applied (checked against ``--adapter``)."""
    return quantized_model(config, params, args.quantize, args.quantize_targets,
                           bool(args.adapter))


def quantized_model(config, params, quantize: str | None, targets: str | None,
                    adapters: bool):
    """``(config, params)`` with ``--quantize`` / ``--quantize-targets`` applied (shared by
    ``cadenza generate`` and ``cadenza serve``); CadenzaError for targets without a scheme
    and for adapters (``adapters``: some were given) on a quantised base."""
    if targets and not quantize:
        raise CadenzaError("--quantize-targets needs --quantize", where="--quantize-targets",
                           fix="add --quantize int8 (or int4, nf4)")
    if adapters and (quantize or config.model.weight_quant != "none"):
        raise CadenzaError("adapters attach to a float base; a QLoRA adapter already serves "
                           "its base quantised as it was trained", where="--adapter",
                           fix="drop --quantize (or use the float base directory)")
    if not quantize:
        return config, params
    from cadenza.models.quant import quantize_model

    return quantize_model(config, params, quantize, targets)


def _finite(x):
    """``x`` with non-finite floats replaced by None (JSON has no NaN or infinity)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _row_extras(extras: dict, i: int) -> dict:
    """Row ``i`` of every per-row extra (first axis = prompts), as JSON-ready values."""
    out = {}
    for k, v in extras.items():
        v = v[i]
        out[k] = v.tolist() if hasattr(v, "tolist") else v
    return out


def _print(result, as_json: bool, show_text: bool) -> None:
    for i, ids in enumerate(result.token_ids):
        row = {"token_ids": ids, "finish_reason": result.finish_reasons[i],
               "logprobs": result.logprobs[i], "stats": result.stats,
               **_row_extras(result.extras, i)}
        if result.text is not None:
            row["text"] = result.text[i]
        if as_json:
            print(json.dumps(_finite(row), allow_nan=False))
        elif show_text:
            print(f"--- prompt {i} ({result.finish_reasons[i]}, {len(ids)} tokens)")
            print(row.get("text", " ".join(map(str, ids))))
            for d, draft in enumerate(row.get("drafts", [])[1:], start=1):
                print(f"--- prompt {i}, draft {d} (perplexity {draft['perplexity']:.2f})")
                print(draft.get("text", " ".join(map(str, draft["token_ids"]))))
    for message in result.stats.get("errors", []):
        print(f"warning: {message}", file=sys.stderr)
    if not as_json:
        s = result.stats
        line = (f"[{s['method']}: prefill {s['prefill_s'] * 1e3:.1f} ms, decode "
                f"{s['decode_tokens_per_s']:.1f} tokens/s over {s['steps']} steps, compile "
                f"{s['compile_s']:.1f} s, import {s.get('import_s', 0):.1f} s, load "
                f"{s.get('load_s', 0):.1f} s")
        if "tokens_per_step" in s:
            line += f", {s['tokens_per_step']:.2f} tokens per step"
        print(line + "]", file=sys.stderr)
