"""The quickstart's decoding methods and how they are timed.

A method is an entry of :data:`DECODE_METHODS`: ``(name, builder)`` where ``builder(ctx)``
returns a :class:`Method` (or raises :class:`Unavailable`, reported in the table, never
faked). :func:`time_methods` compiles every method once, then runs all of them in turn,
``repeats`` times, rotating the order each round (interleaved, so machine load hits all
of them alike), and reports medians with their spread.
"""

import dataclasses
import importlib.util
import pathlib
import statistics
import time
from collections.abc import Callable

import numpy as np


class Unavailable(Exception):
    """A method or stage whose library or inputs are not part of this run (reported)."""


@dataclasses.dataclass
class Pass:
    """One decode of every prompt (each prompt alone, batch 1).

    ``token_ids``: generated ids per prompt; ``decode_s``: seconds spent in the on-device
    decode loops after prefill, summed over prompts (None where the method does not
    report it); ``decoded``: tokens produced by those loops; ``forwards``: target forwards
    in them (None where it does not apply)."""

    token_ids: list[list[int]]
    decode_s: float | None
    decoded: int
    forwards: int | None


@dataclasses.dataclass
class Method:
    """A method ready to run: ``run()`` decodes every prompt once and returns a :class:`Pass`;
    ``greedy_equivalent``: the method promises greedy's output exactly; ``notes``: shown in
    the table."""

    run: Callable[[], Pass]
    greedy_equivalent: bool
    notes: str


@dataclasses.dataclass
class Context:
    """What the decoding methods need: models, params, prompts and settings.

    ``draft_params`` are the LM-pretrained draft's; ``extras`` holds optional inputs by
    name: ``distilled_draft`` (params of the same draft model distilled from the target),
    ``ngram_dir`` (n-gram table), ``medusa_dir`` (trained heads), ``lud``
    (``(model, params, LudConfig)``)."""

    target: object          # Transformer of the (instruction-tuned) target
    target_params: dict
    draft: object           # Transformer of the draft model
    draft_params: dict
    tokenizer: object
    prompts: list[list[int]]
    new_tokens: int
    out_dir: pathlib.Path
    extras: dict = dataclasses.field(default_factory=dict)


def have(module: str) -> bool:
    """Whether ``module`` is part of this build (found without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _require(module: str) -> None:
    if not have(module):
        raise Unavailable(f"not available in this build ({module} is missing)")


def _run(ctx: Context, name: str, fields: dict, resources: dict, model=None, params=None):
    """A ``run()`` decoding every prompt alone with the registry's method ``name`` (config
    ``fields`` as in :func:`cadenza.decode.config.with_fields`, in-memory ``resources``)."""
    from cadenza.decode import DecodeConfig, generate
    from cadenza.decode.config import with_fields

    # EOS ignored: every method writes the same number of tokens, so tokens/s compare
    cfg = with_fields(DecodeConfig(method=name, max_new_tokens=ctx.new_tokens, ignore_eos=True),
                      **fields)
    model = ctx.target if model is None else model
    params = ctx.target_params if params is None else params

    def run() -> Pass:
        results = [generate(model, params, [p], cfg, tokenizer=ctx.tokenizer, **resources)
                   for p in ctx.prompts]
        forwards = [r.stats.get("target_forwards", r.extras.get("steps")) for r in results]
        forwards = [None if f is None else int(np.sum(f)) for f in forwards]
        return Pass([r.token_ids[0] for r in results],
                    sum(r.stats["decode_s"] for r in results),
                    sum(len(r.token_ids[0]) - 1 for r in results),
                    None if None in forwards else sum(forwards))

    return run


def _greedy(ctx: Context) -> Method:
    return Method(_run(ctx, "greedy", {}, {}), True,
                  "one target forward per token (KV cache, jitted while_loop)")


def _sample(ctx: Context) -> Method:
    return Method(_run(ctx, "sample", {"sampling__temperature": 0.8}, {}), False,
                  "temperature 0.8, fixed seeds (one target forward per token)")


def _speculative(ctx: Context, params, label: str) -> Method:
    """Draft-model speculative decoding, gamma 4, with the draft's ``params`` (``label``
    says which draft they are)."""
    _require("cadenza.decode.speculative")
    from cadenza.decode.speculative import DraftModel

    gamma = 4
    return Method(_run(ctx, "speculative", {"speculative__gamma": gamma},
                       {"drafter": DraftModel(ctx.draft.config, gamma=gamma),
                        "draft_params": (params, None)}), True,
                  f"{label}; {ctx.draft.config.num_params() / 1e6:.2f}M params, "
                  f"gamma={gamma}, greedy acceptance")


def _distilled_draft(ctx: Context) -> Method:
    if "distilled_draft" not in ctx.extras:
        raise Unavailable("not run: no distilled draft (cadenza.train.distill_task is missing)")
    return _speculative(ctx, ctx.extras["distilled_draft"],
                        "draft model distilled from the tuned target, started from the "
                        "LM-pretrained draft")


def _pretrained_draft(ctx: Context) -> Method:
    return _speculative(ctx, ctx.draft_params, "LM-pretrained draft model, not distilled")


def _adaptive(ctx: Context) -> Method:
    _require("cadenza.decode.specdec_head")
    from cadenza.decode.specdec_head import StopRule
    from cadenza.decode.speculative import DraftModel

    gamma, threshold = 8, 0.7
    distilled = "distilled_draft" in ctx.extras
    params = ctx.extras["distilled_draft"] if distilled else ctx.draft_params
    drafter = DraftModel(ctx.draft.config, gamma, stop=StopRule("confidence", threshold, 1),
                         name="adaptive-confidence")
    return Method(_run(ctx, "speculative", {"speculative__gamma": gamma,
                                            "speculative__adaptive": "confidence"},
                       {"drafter": drafter, "draft_params": (params, None)}), True,
                  f"the {'distilled' if distilled else 'LM-pretrained'} draft, training-free "
                  f"confidence stop rule (at most {gamma}, stop when P(reject) > {threshold})")


def _prompt_lookup(ctx: Context) -> Method:
    _require("cadenza.decode.prompt_lookup")
    return Method(_run(ctx, "ngram", {"speculative__gamma": 4, "speculative__ngram_max": 3},
                       {}), True, "prompt-lookup n-gram drafts (no draft model), gamma=4")


def _recycling(ctx: Context) -> Method:
    _require("cadenza.decode.token_recycling")
    from cadenza.decode.config import RecyclingConfig

    r = RecyclingConfig()
    return Method(_run(ctx, "recycling", {}, {}), True,
                  f"Token Recycling: training-free tree drafts from the target's own top-{r.k} "
                  f"leftovers ({r.nodes} nodes, depth {r.depth})")


def _layer_skip(ctx: Context) -> Method:
    _require("cadenza.decode.layer_skip")
    layers = ctx.target.config.num_layers
    skip, gamma = [layers // 2], 4
    return Method(_run(ctx, "layer_skip", {"layer_skip__skip_layers": skip,
                                           "speculative__gamma": gamma}, {}), True,
                  f"layer-skip self-speculation: the tuned target without layer {skip[0]} "
                  f"of {layers} drafts for itself (no second model), gamma={gamma}")


def _medusa(ctx: Context) -> Method:
    _require("cadenza.decode.medusa")
    if "medusa_dir" not in ctx.extras:
        raise Unavailable(f"not run: {ctx.extras.get('medusa_skipped', 'no Medusa heads')}")
    from cadenza.decode.medusa import load_medusa_heads

    drafter, heads = load_medusa_heads(ctx.extras["medusa_dir"], ctx.target.config)
    return Method(_run(ctx, "medusa", {}, {"drafter": drafter, "draft_params": heads}), True,
                  f"{drafter.num_heads} Medusa heads trained on the tuned target, "
                  f"{len(drafter.paths)}-node tree")


def _superposed(ctx: Context) -> Method:
    _require("cadenza.decode.superposed")
    from cadenza.decode.ngram_table import load_ngram_table

    table = load_ngram_table(ctx.extras["ngram_dir"]).to_device()
    return Method(_run(ctx, "superposed", {"superposed__num_drafts": 3}, {"table": table}),
                  False, "k=3 drafts from one stream; tokens/s counts the best draft")


def _lud(ctx: Context) -> Method:
    _require("cadenza.decode.lud")
    if "lud" not in ctx.extras:
        raise Unavailable(f"not run: {ctx.extras.get('lud_skipped', 'no LUD model')}")
    model, params, lud = ctx.extras["lud"]
    return Method(_run(ctx, "lud", {}, {"lud": lud}, model=model, params=params), False,
                  f"the tuned target LUD-fine-tuned (one extra vocabulary row for the "
                  f"placeholder), lookahead {lud.lookahead}, beta {lud.beta} "
                  f"({ctx.extras.get('lud_beta_note', 'the default')}); accepted tokens per "
                  f"model call")


# (name, builder). A builder whose library or inputs are missing raises Unavailable.
DECODE_METHODS: list[tuple[str, Callable[[Context], Method]]] = [
    ("greedy", _greedy),
    ("sampling (T=0.8)", _sample),
    ("speculative (distilled draft)", _distilled_draft),
    ("speculative (LM-pretrained draft)", _pretrained_draft),
    ("adaptive draft length", _adaptive),
    ("prompt lookup (n-gram)", _prompt_lookup),
    ("Token Recycling", _recycling),
    ("layer-skip", _layer_skip),
    ("Medusa", _medusa),
    ("superposed (k=3)", _superposed),
    ("LUD", _lud),
]


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def time_methods(methods: dict[str, Method], repeats: int) -> dict[str, dict]:
    """Time every method ``repeats`` times, interleaved (the order rotates each round),
    after one untimed pass each that compiles.

    The first method is the baseline (greedy). Returns, per method: ``token_ids`` (of the
    first timed pass), ``deterministic`` (every pass gave the same ids), ``tokens``,
    ``tokens_per_s`` and ``decode_tokens_per_s`` (end to end and decode loop only: median,
    min, max over the repeats; decode-only is None where the method does not report
    it), ``speedup`` (per repeat, tokens/s over the baseline's in the same round:
    median, min, max) and ``accepted_per_forward``."""
    names = list(methods)
    for name in names:
        methods[name].run()
    walls = {n: [] for n in names}
    passes = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            p = methods[name].run()
            walls[name].append(time.perf_counter() - t0)
            passes[name].append(p)
    base = names[0]
    base_tps = [sum(map(len, p.token_ids)) / w for p, w in zip(passes[base], walls[base])]
    out = {}
    for name in names:
        ps, first = passes[name], passes[name][0]
        tokens = sum(map(len, first.token_ids))
        tps = [sum(map(len, p.token_ids)) / w for p, w in zip(ps, walls[name])]
        decode = (None if first.decode_s is None else
                  _spread([p.decoded / p.decode_s for p in ps if p.decode_s]))
        out[name] = {
            "token_ids": first.token_ids, "tokens": tokens,
            "deterministic": all(p.token_ids == first.token_ids for p in ps),
            "tokens_per_s": _spread(tps), "decode_tokens_per_s": decode,
            "speedup": _spread([t / b for t, b in zip(tps, base_tps)]),
            "accepted_per_forward": (first.decoded / first.forwards if first.forwards else None)}
    return out
