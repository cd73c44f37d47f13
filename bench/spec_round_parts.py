"""Where a draft-model round's time goes: its verify, its drafting, and the two together.

Run: ``.venv/bin/python bench/spec_round_parts.py [--runs runs/spec_methods/20m] [--draft
draft-distilled-150]`` after ``bench/speculative_methods.py`` has trained and cached its
models there (nothing is trained here). Each contender runs ``--rounds`` times in one jitted
``fori_loop`` (batch 1, a held-out prompt cached, 208 cache slots as in the benchmark), in
the layout decoding uses:

- ``plain step``: cadenza's greedy step; ``round (gamma=G)``: the speculative round with
  the draft (draft, verify, acceptance, bookkeeping);
- ``verify fwd(G+1)``: the target's forward over G + 1 tokens alone;
- ``draft alone``: the draft's proposal of G tokens alone (its weights stay in the CPU's
  caches from one round to the next);
- ``verify + draft``: the two in turn, as in a round, without the acceptance logic.

``round - (verify + draft)`` is the round's own logic; ``verify + draft - verify - draft
alone`` is what running the two models in turn costs beyond each alone (each evicts the
other's weights and caches). Medians of ``--repeats`` interleaved repeats with min and max,
wall time and process CPU time.

Results: ``bench/results/<device>/spec_round_parts.{json,md}`` (stamped).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
from spec_round_cost import load_pair

from cadenza.decode import DecodeConfig
from cadenza.decode.config import SpeculativeConfig
from cadenza.decode.driver import prepare
from cadenza.decode.registry import build
from cadenza.decode.speculative import Context, DraftModel
from cadenza.models import Transformer
from cadenza.provenance import load_note, provenance, results_dir


def programs(target, tparams, dcfg, dparams, prompt, gamma, rounds):
    """``{name: (compiled, args)}``: each contender as one program running ``rounds`` times."""
    base = DecodeConfig(max_new_tokens=128, ignore_eos=True, seed=0)
    plain, pp = build(target, tparams, dataclasses.replace(base, method="greedy"))
    spec, sp = build(target, tparams, dataclasses.replace(
        base, method="speculative", speculative=SpeculativeConfig(gamma=gamma)),
        drafter=DraftModel(dcfg, gamma), draft_params=(dparams, None))
    batch = prepare(spec, [prompt], base).batch
    fwd, drafter = spec.forward, spec.drafter
    dfwd = drafter._forward(fwd)
    length = jnp.asarray([len(prompt)])
    ctx = Context(prev=jnp.asarray([prompt[-2]]), pending=jnp.asarray([prompt[-1]]),
                  lengths=length, hidden=jnp.zeros((1, target.config.hidden_size)), seen=None,
                  keys=None, spec=spec.spec, forward=fwd)

    def verify(params, carry):            # the target over gamma + 1 tokens at the prompt's end
        cache, acc = carry
        tokens = jnp.full((1, gamma + 1), prompt[-1], jnp.int32) + acc
        logits, _, cache = fwd(params, tokens, cache=cache.with_lengths(length))
        return cache, acc + jnp.argmax(logits[0, -1]).astype(jnp.int32) % 2

    def draft(params, carry):
        cache, acc = carry
        prop, cache = drafter.propose(params, cache, ctx.replace(pending=ctx.pending + acc))
        return cache, acc + prop.tokens[0, -1] % 2

    def both(params, carry):
        (tc, dc), acc = carry
        tc, acc = verify(params[0], (tc, acc))
        dc, acc = draft(params[1], (dc, acc))
        return (tc, dc), acc

    zero = jnp.int32(0)
    tcache = fwd.init_cache(sp[0], 1, batch.max_len)
    dcache = dfwd.init_cache(sp[1][0], 1, batch.max_len)
    state = {"plain step": (plain, pp), f"round (gamma={gamma})": (spec, sp)}
    contenders = {name: (m.step, (params, prefilled(m, params, prompt, base)))
                  for name, (m, params) in state.items()}
    contenders[f"verify fwd({gamma + 1})"] = (verify, (sp[0], (tcache, zero)))
    contenders["draft alone"] = (draft, (sp[1], (dcache, zero)))
    contenders["verify + draft"] = (both, (sp, ((tcache, dcache), zero)))
    return compile_looped(contenders, rounds)


def prefilled(method, params, prompt, config):
    """``method``'s state after its prefill of ``prompt`` (batch 1)."""
    return jax.jit(method.prefill)(params, prepare(method, [prompt], config).batch)


def compile_looped(contenders: dict, rounds: int) -> dict:
    """``{name: (compiled, args)}`` from ``{name: (step, args)}``: each ``step(params,
    carry) -> carry`` run ``rounds`` times in one jitted ``fori_loop`` over ``args =
    (params, carry)``."""
    def looped(step):
        return lambda params, carry: jax.lax.fori_loop(0, rounds, lambda i, c: step(params, c),
                                                       carry)
    return {name: (jax.jit(looped(fn)).lower(*args).compile(), args)
            for name, (fn, args) in contenders.items()}


def measure(compiled: dict, rounds: int, repeats: int) -> dict:
    """Warm up, then time every program ``repeats`` times, interleaved: ``{"wall_ms": {name:
    spread}, "cpu_ms": {name: spread}}`` per round (a spread: median, min, max)."""
    for fn, a in compiled.values():
        jax.block_until_ready(fn(*a))
    wall = {k: [] for k in compiled}
    cpu = {k: [] for k in compiled}
    for _ in range(repeats):
        for name, (fn, a) in compiled.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*a))
            wall[name].append((time.perf_counter() - t0) / rounds * 1e3)
            cpu[name].append((time.process_time() - c0) / rounds * 1e3)

    def spread(v):
        return {"median": statistics.median(v), "min": min(v), "max": max(v)}

    return {"wall_ms": {k: spread(v) for k, v in wall.items()},
            "cpu_ms": {k: spread(v) for k, v in cpu.items()}}


def table(report: dict) -> list[str]:
    """Markdown rows ``| contender | wall ms [min-max] | CPU ms [min-max] |`` of a report."""
    lines = ["| contender | wall ms [min-max] | CPU ms [min-max] |", "|---|---|---|"]
    for name, w in report["wall_ms"].items():
        c = report["cpu_ms"][name]
        lines.append(f"| {name} | {w['median']:.2f} [{w['min']:.2f}-{w['max']:.2f}] | "
                     f"{c['median']:.2f} [{c['min']:.2f}-{c['max']:.2f}] |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/spec_methods/20m")
    p.add_argument("--draft", default="draft-distilled-150",
                   help="the draft's run-directory prefix under --runs")
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = p.parse_args()
    runs, load_start = pathlib.Path(args.runs), os.getloadavg()[0]
    tcfg, tparams, dcfg, dparams, prompts = load_pair(runs, args.draft, 2)
    target = Transformer(tcfg.model)
    compiled = programs(target, tparams, dcfg.model, dparams, prompts[0], args.gamma,
                        args.rounds)
    report = {"meta": {"benchmark": "spec_round_parts", **provenance(),
                       "load_avg_1m_start": load_start, "runs": str(runs), "draft": args.draft,
                       "gamma": args.gamma, "rounds": args.rounds, "repeats": args.repeats},
              **measure(compiled, args.rounds, args.repeats)}
    out = results_dir(__file__, args.out)
    (out / "spec_round_parts.json").write_text(json.dumps(report, indent=2))
    (out / "spec_round_parts.md").write_text(render(report))
    print(render(report))


def render(report: dict) -> str:
    m, g = report["meta"], report["meta"]["gamma"]
    lines = [
        "# Where a draft-model round's time goes", "",
        f"device {m['device_kind']} ({m['cpu_count']} cores), jax {m['jax']}, commit "
        f"{m['commit']}, {m['date']}; {load_note(m)}. "
        f"Models "
        f"from {m['runs']} (draft {m['draft']}), gamma={g}, batch 1; ms per round (per step "
        f"for plain), {m['rounds']} rounds per call, median of {m['repeats']} interleaved "
        "repeats [min-max].", "",
        *table(report)]
    for unit in ("wall_ms", "cpu_ms"):
        v = {k: x["median"] for k, x in report[unit].items()}
        ver, alone, both = v[f"verify fwd({g + 1})"], v["draft alone"], v["verify + draft"]
        lines += ["", f"{unit.split('_')[0]}: verify + draft alone {ver + alone:.2f}; together "
                  f"{both:.2f} (+{both - ver - alone:.2f} for running the two models in turn); "
                  f"the round {v[f'round (gamma={g})']:.2f} (+"
                  f"{v[f'round (gamma={g})'] - both:.2f} for its own logic)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
