"""``cadenza serve``: an OpenAI-compatible HTTP server for a model directory.

The engine (:mod:`cadenza.decode.engine`) decodes ``--slots`` requests at a time;
``--draft DIR`` (a draft model) or ``--method ngram`` (prompt lookup) makes every
decode step a speculative round (greedy outputs unchanged). See docs/serving.md.
"""

import dataclasses
import pathlib

from cadenza.errors import CadenzaError


def register(subparsers) -> None:
    from cadenza.decode.cli import add_quantize_flags

    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model directory: /v1/completions, /v1/chat/completions "
                    "(stream: true for server-sent events), /v1/models, /health, /metrics.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="model directory (config.yaml, params, optional tokenizer/) "
                        "or Hugging Face folder")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve a LoRA adapter (cadenza adapter directory or peft folder) as "
                        "model NAME next to the base (repeatable); requests pick one by "
                        "their 'model' field")
    p.add_argument("--method", choices=("plain", "ngram", "speculative"), default=None,
                   help="decode steps: plain, ngram (prompt lookup) or speculative (needs "
                        "--draft; the default when --draft is given)")
    p.add_argument("--draft", metavar="DIR", help="draft model directory (speculative)")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per speculative round")
    add_quantize_flags(p, kv_default="auto")
    p.add_argument("--slots", type=int, default=8, help="requests decoded at once")
    p.add_argument("--max-len", type=int, default=None,
                   help="prompt + generated tokens per request (default: the model's "
                        "max_position_embeddings, at most 2048)")
    p.add_argument("--model-name", default=None,
                   help="the model's name in the API (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--shutdown-grace", type=float, default=10.0, metavar="S",
                   help="on SIGINT/SIGTERM, seconds open requests may finish before the "
                        "rest are cancelled")
    p.set_defaults(func=_serve)


def method_config(method: str | None, draft: str | None, gamma: int):
    """The DecodeConfig for ``--method``/``--draft``/``--gamma`` (CadenzaError on a clash)."""
    from cadenza.decode.config import DecodeConfig, SpeculativeConfig

    method = method or ("speculative" if draft else "plain")
    if draft and method != "speculative":
        raise CadenzaError(f"--draft does not apply to --method {method}", where="--draft",
                           fix="drop --draft, or use --method speculative")
    if method == "speculative" and not draft:
        raise CadenzaError("--method speculative needs --draft DIR", where="--method",
                           fix="give a draft model directory, or use --method ngram")
    if gamma < 1:
        raise CadenzaError(f"--gamma must be >= 1, got {gamma}", where="--gamma",
                           fix="e.g. --gamma 4")
    name = {"plain": "greedy"}.get(method, method)
    return DecodeConfig(method=name, speculative=SpeculativeConfig(draft=draft or "",
                                                                   gamma=gamma))


def _serve(args) -> int:
    if args.slots < 1:
        raise CadenzaError(f"--slots must be >= 1, got {args.slots}", where="--slots",
                           fix="e.g. --slots 8")
    config = method_config(args.method, args.draft, args.gamma)
    from cadenza.decode.multi_lora import parse_adapter_specs

    specs = parse_adapter_specs(args.adapter)

    import uvicorn

    from cadenza.decode.cli import chat_stop_ids, model_tokenizer, quantized_model
    from cadenza.decode.engine import Engine
    from cadenza.models import Transformer, load_model
    from cadenza.serve.app import make_app

    mconfig, params = load_model(args.checkpoint)
    mconfig, params = quantized_model(mconfig, params, args.quantize, args.quantize_targets,
                                      bool(specs))
    config = dataclasses.replace(config, kv_cache=args.kv_cache)
    tokenizer, _ = model_tokenizer(args.checkpoint)
    max_len = args.max_len or min(mconfig.model.max_position_embeddings, 2048)
    model, adapters = Transformer(mconfig.model), {}
    if specs:      # a bank: each slot picks its adapter (or none) by index, as data
        from cadenza.decode.multi_lora import load_adapter_bank

        bank = load_adapter_bank(args.checkpoint, specs, base_params=params)
        model, params = bank.forward, bank.params(params, [])
        adapters = {name: i for i, name in enumerate(bank.names)}
    engine = Engine.build(model, params, config, tokenizer=tokenizer, slots=args.slots,
                          max_len=max_len, adapters=adapters)
    template, chat_stops = None, ()
    if tokenizer is not None and tokenizer.chat_template:
        from cadenza.models.chat_template import ChatTemplate

        template, chat_stops = ChatTemplate.from_tokenizer(tokenizer), chat_stop_ids(tokenizer)
    name = args.model_name or pathlib.Path(args.checkpoint).resolve().name
    app = make_app(engine.start(), name, template=template, chat_stop_ids=chat_stops)
    print(f"serving {name} ({engine.method_name}, {args.slots} slots, {max_len} tokens per "
          f"request) at http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                  timeout_graceful_shutdown=args.shutdown_grace)).run()
    engine.close(cancel=True)
    return 0
