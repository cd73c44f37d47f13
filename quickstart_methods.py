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

    ``extras`` holds optional inputs by name: ``ngram_dir`` (n-gram table),
    ``medusa_dir`` (trained heads), ``lud`` (``(model, params, LudConfig)``)."""

    target: object          # Transformer of the (instruction-tuned) target
    target_params: dict
    draft: object           # Transformer of the draft model
    draft_params: dict
    tokenizer: object
    prompts: list[list[int]]
    new_tokens: int
    out_dir: pathlib.Path
    extras: dict = dataclasses.field(default_factory=dict)


def _require(module: str) -> None:
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise Unavailable(f"not available in this build ({module} is missing)")


def _config(ctx: Context, **fields):
    from cadenza.decode import DecodeConfig

    return DecodeConfig(max_new_tokens=ctx.new_tokens, **fields)


def _from_results(results) -> Pass:
    """A Pass from one GenerateResult per prompt."""
    forwards = [r.stats.get("target_forwards") for r in results]
    return Pass([r.token_ids[0] for r in results],
                sum(r.stats["decode_s"] for r in results),
                sum(len(r.token_ids[0]) - 1 for r in results),
                None if None in forwards else sum(forwards))


def _greedy(ctx: Context) -> Method:
    from cadenza.decode import generate

    cfg = _config(ctx, method="greedy")
    return Method(lambda: _from_results([generate(ctx.target, ctx.target_params, [p], cfg)
                                         for p in ctx.prompts]),
                  True, "one target forward per token (KV cache, jitted while_loop)")


def _sample(ctx: Context) -> Method:
    from cadenza.decode import generate

    cfg = _config(ctx, method="sample", temperature=0.8, seed=0)
    return Method(lambda: _from_results([generate(ctx.target, ctx.target_params, [p], cfg)
                                         for p in ctx.prompts]),
                  False, "temperature 0.8, fixed seeds (one target forward per token)")


def _speculative(ctx: Context, drafter, draft_params, notes: str, **fields) -> Method:
    from cadenza.decode.speculative import speculative_generate

    cfg = _config(ctx, method="greedy", **fields)
    return Method(lambda: _from_results([
        speculative_generate(ctx.target, ctx.target_params, [p], cfg, drafter=drafter,
                             draft_params=draft_params) for p in ctx.prompts]), True, notes)


def _draft_model(ctx: Context) -> Method:
    _require("cadenza.decode.speculative")
    from cadenza.decode.speculative import DraftModel

    gamma = 4
    return _speculative(ctx, DraftModel(ctx.draft.config, gamma=gamma), (ctx.draft_params, None),
                        f"LM-pretrained draft model ({ctx.draft.config.num_params() / 1e6:.2f}M "
                        f"params; not distilled), gamma={gamma}, greedy acceptance")


def _adaptive(ctx: Context) -> Method:
    _require("cadenza.decode.adaptive")
    from cadenza.decode.adaptive import StopRule
    from cadenza.decode.speculative import DraftModel

    gamma, threshold = 8, 0.7
    drafter = DraftModel(ctx.draft.config, gamma, stop=StopRule("confidence", threshold, 1),
                         name="adaptive-confidence")
    return _speculative(ctx, drafter, (ctx.draft_params, None),
                        f"same draft, training-free confidence stop rule (at most {gamma}, "
                        f"stop when P(reject) > {threshold})")


def _prompt_lookup(ctx: Context) -> Method:
    _require("cadenza.decode.ngram_draft")
    from cadenza.decode.ngram_draft import PromptLookup

    return _speculative(ctx, PromptLookup(gamma=4, max_ngram=3), None,
                        "prompt-lookup n-gram drafts (no draft model), gamma=4")


def _medusa(ctx: Context) -> Method:
    _require("cadenza.decode.medusa")
    if "medusa_dir" not in ctx.extras:
        raise Unavailable(f"not run: {ctx.extras.get('medusa_skipped', 'no Medusa heads')}")
    from cadenza.decode.medusa import load_medusa_heads

    drafter, heads = load_medusa_heads(ctx.extras["medusa_dir"], ctx.target.config)
    return _speculative(ctx, drafter, heads, f"{drafter.num_heads} Medusa heads trained on the "
                        f"tuned target, {len(drafter.paths)}-node tree")


def _superposed(ctx: Context) -> Method:
    from cadenza.decode.ngram import load_ngram_table
    from cadenza.decode.superposed import SuperposedConfig, superposed_generate

    table = load_ngram_table(ctx.extras["ngram_dir"]).to_device()
    cfg = SuperposedConfig(num_drafts=3, max_new_tokens=ctx.new_tokens)

    def run():
        outs = [superposed_generate(ctx.target, ctx.target_params, [p], table, cfg)
                for p in ctx.prompts]
        ids = [[int(t) for t in o.tokens[0, 0, :o.lengths[0, 0]]] for o in outs]
        return Pass(ids, None, sum(len(i) for i in ids), None)

    return Method(run, False, "k=3 drafts from one stream; tokens/s counts the best draft")


def _lud(ctx: Context) -> Method:
    _require("cadenza.decode.lud")
    if "lud" not in ctx.extras:
        raise Unavailable(f"not run: {ctx.extras.get('lud_skipped', 'no LUD model')}")
    from cadenza.decode.lud import lud_generate

    model, params, lud = ctx.extras["lud"]

    def run():
        outs = [lud_generate(model, params, [p], lud, max_new_tokens=ctx.new_tokens)
                for p in ctx.prompts]
        ids = [[int(t) for t in o.tokens[0, :int(o.num_tokens[0])]] for o in outs]
        return Pass(ids, None, sum(len(i) for i in ids), sum(int(o.steps[0]) for o in outs))

    return Method(run, False, f"the tuned target LUD-fine-tuned (one extra vocabulary row for "
                  f"the placeholder), lookahead {lud.lookahead}, beta {lud.beta}")


# (name, builder). A builder whose library or inputs are missing raises Unavailable.
DECODE_METHODS: list[tuple[str, Callable[[Context], Method]]] = [
    ("greedy", _greedy),
    ("sampling (T=0.8)", _sample),
    ("speculative (draft model)", _draft_model),
    ("adaptive draft length", _adaptive),
    ("prompt lookup (n-gram)", _prompt_lookup),
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
