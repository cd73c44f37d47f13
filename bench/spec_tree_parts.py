"""Where a tree round's time goes (Token Recycling, Hydra, Medusa): drafting, the tree
verify, acceptance and the cache compaction, next to plain forwards of the same width.

Run: ``.venv/bin/python bench/spec_tree_parts.py [--runs runs/spec_methods/20m]
[--recycling 15x4,4x3]`` after ``bench/speculative_methods.py`` has trained and cached its
models there (nothing is trained here). As ``spec_round_parts.py`` (whose timing helpers it
uses): each contender runs ``--rounds`` times in one jitted ``fori_loop`` (batch 1, a
held-out prompt cached, 208 cache slots as in the benchmark), in the layout decoding uses;
for each tree method, T = tree nodes + 1 (the pending token):

- ``round``: the speculative round (draft, verify, acceptance, compaction, observe);
- ``draft alone``: the drafter's proposal (adjacency lookups, or the heads' forwards);
- ``verify tree fwd(T)``: the target's forward over the tree (ancestor mask, positions
  ``L + depth``) alone; ``fwd(T) chain``: the same width as a causal chain;
- ``compact alone``: moving the accepted path's keys/values into consecutive slots;
- ``observe alone``: the drafter's update from the verify (recycling's adjacency writes).

``round - (draft + verify tree + compact + observe)`` is acceptance and bookkeeping;
``plain step`` and ``fwd(1)`` give the scale (a round pays when its accepted tokens per
forward exceed ``round / plain step``). Medians of ``--repeats`` interleaved repeats with
min and max, wall time and process CPU time.

Results: ``bench/results/<device>/spec_tree_parts.{json,md}`` (stamped).
"""

import argparse
import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
from spec_round_cost import load_target
from spec_round_parts import compile_looped, measure, prefilled, table

from cadenza.decode import DecodeConfig
from cadenza.decode.config import RecyclingConfig
from cadenza.decode.hydra import Hydra, hydra_draft_params
from cadenza.decode.medusa import Medusa, load_tree_heads
from cadenza.decode.registry import build
from cadenza.decode.speculative import Context, Observation
from cadenza.decode.verify import compact, tree_mask, verify
from cadenza.models import Transformer
from cadenza.provenance import load_note, provenance, results_dir


def tree_methods(target, tparams, runs, recycling):
    """``{label: (method, method params)}``: Token Recycling at each ``(nodes, depth)`` of
    ``recycling``, then Medusa and Hydra with their cached heads (when present)."""
    base = DecodeConfig(max_new_tokens=128, ignore_eos=True, seed=0)
    out = {}
    for nodes, depth in recycling:
        cfg = dataclasses.replace(base, method="recycling",
                                  recycling=RecyclingConfig(nodes=nodes, depth=depth))
        out[f"recycling {nodes}x{depth}"] = build(target, tparams, cfg)
    for cls, name in ((Medusa, "medusa"), (Hydra, "hydra")):
        if (runs / f"{name}-heads-200").is_dir():
            drafter, heads = load_tree_heads(runs / f"{name}-heads-200", target.config, cls)
            dp = hydra_draft_params(heads, tparams) if cls is Hydra else heads
            out[f"{name} {len(drafter.parents)} nodes"] = build(
                target, tparams, dataclasses.replace(base, method=name), drafter=drafter,
                draft_params=dp)
    return out


def parts(label, method, params, prompt, base):
    """``{name: (step, (params, carry))}``: ``method``'s round and its parts (module
    docstring), each a ``step(params, carry) -> carry`` for :func:`compile_looped`."""
    tparams, dparams = params
    state = prefilled(method, params, prompt, base)
    tree, fwd, drafter = method.tree, method.forward, method.drafter
    t = len(tree.parents)
    anc, depth = jnp.asarray(tree_mask(tree.parents)), jnp.asarray(tree.depth)
    length = state.cache.lengths
    ctx = Context(prev=state.prev, pending=state.out.last, lengths=length, hidden=state.hidden,
                  seen=None, keys=None, spec=method.spec, forward=fwd, cache=state.cache)
    zero = jnp.int32(0)

    def draft(p, carry):
        dstate, acc = carry
        moved = ctx.replace(pending=ctx.pending + acc, hidden=ctx.hidden + acc)  # no hoisting
        prop, dstate = drafter.propose(p, dstate, moved)
        return dstate, acc + prop.tokens[0, -1] % 2

    def forward(tree_shaped):
        def run(p, carry):
            cache, acc = carry
            toks = jnp.full((1, t), 5, jnp.int32) + acc
            pos = length[:, None] + (depth[None] if tree_shaped else jnp.arange(t)[None])
            logits, _, cache = verify(fwd, p, cache.with_lengths(length), toks, positions=pos,
                                      tail_mask=anc if tree_shaped else None)
            return cache, acc + jnp.argmax(logits[0, -1]).astype(jnp.int32) % 2
        return run

    def move(p, carry):
        cache, acc = carry
        path = jnp.asarray(tree.retrieve)[acc % t][None]
        cache = compact(cache.with_lengths(length), path)
        return cache, acc + 1 + cache.k[0, 0, 0, 0, 0].astype(jnp.int32) % 2

    logits = jax.random.normal(jax.random.key(0), (1, t, fwd.config.vocab_size))
    hidden = jnp.zeros((1, t, fwd.config.hidden_size))

    def observe(p, carry):
        dstate, acc = carry
        win = acc % t
        obs = Observation(logits=logits + acc, hidden=hidden,
                          path=jnp.asarray(tree.retrieve)[win][None], n=depth[win][None],
                          emitted=jnp.zeros((1, tree.retrieve.shape[1]), jnp.int32),
                          active=jnp.ones((1,), bool), lengths=length)
        return drafter.observe(p, dstate, obs), acc + 1

    _, dstate = drafter.propose(dparams, state.drafter, ctx)
    out = {f"{label}: round": (method.step, (params, state)),
           f"{label}: draft alone": (draft, (dparams, (state.drafter, zero))),
           f"{label}: verify tree fwd({t})": (forward(True), (tparams, (state.cache, zero))),
           f"fwd({t}) chain": (forward(False), (tparams, (state.cache, zero))),
           f"{label}: compact alone": (move, (None, (state.cache, zero))),
           f"{label}: observe alone": (observe, (dparams, (dstate, zero)))}
    return out


def draft_alone_ms(method, params, prompt, base, rounds: int, repeats: int) -> float:
    """Median wall ms of ``method``'s drafter proposing one round alone (the heads'
    forwards, or the adjacency lookups), ``rounds`` proposals per call (see :func:`parts`)."""
    step = parts("tree", method, params, prompt, base)["tree: draft alone"]
    return measure(compile_looped({"draft": step}, rounds), rounds,
                   repeats)["wall_ms"]["draft"]["median"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/spec_methods/20m")
    p.add_argument("--recycling", default="15x4,4x3",
                   help="recycling trees as NODESxDEPTH, comma-separated")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = p.parse_args()
    runs, load_start = pathlib.Path(args.runs), os.getloadavg()[0]
    recycling = [tuple(int(x) for x in s.split("x")) for s in args.recycling.split(",") if s]
    tcfg, tparams, prompts = load_target(runs, 2)
    target = Transformer(tcfg.model)
    base = DecodeConfig(max_new_tokens=128, ignore_eos=True, seed=0)
    plain, pp = build(target, tparams, dataclasses.replace(base, method="greedy"))
    contenders = {"plain step": (plain.step, (pp, prefilled(plain, pp, prompts[0], base)))}
    for label, (method, params) in tree_methods(target, tparams, runs, recycling).items():
        contenders.update(parts(label, method, params, prompts[0], base))
    report = {"meta": {"benchmark": "spec_tree_parts", **provenance(),
                       "load_avg_1m_start": load_start, "runs": str(runs),
                       "recycling": args.recycling, "rounds": args.rounds,
                       "repeats": args.repeats},
              **measure(compile_looped(contenders, args.rounds), args.rounds, args.repeats)}
    out = results_dir(__file__, args.out)
    (out / "spec_tree_parts.json").write_text(json.dumps(report, indent=2))
    (out / "spec_tree_parts.md").write_text(render(report))
    print(render(report))


def summary(times: dict) -> list[str]:
    """One line per tree method: its round next to its parts (medians, ms)."""
    v = {k: x["median"] for k, x in times.items()}
    lines = []
    for name in v:
        if not name.endswith(": round"):
            continue
        label = name[:-len(": round")]
        own = {k[len(label) + 2:]: x for k, x in v.items() if k.startswith(label + ": ")}
        verify_name = next(k for k in own if k.startswith("verify tree"))
        summed = sum(x for k, x in own.items() if k != "round")
        steps = own["round"] / v["plain step"]
        lines.append(f"- {label}: round {own['round']:.2f} ms = {steps:.2f} plain steps; "
                     f"{verify_name} {own[verify_name]:.2f}, draft "
                     f"{own['draft alone']:.2f}, compact {own['compact alone']:.2f}, observe "
                     f"{own['observe alone']:.2f}; the rest (acceptance, bookkeeping) "
                     f"{own['round'] - summed:+.2f}.")
    return lines


def render(report: dict) -> str:
    m = report["meta"]
    lines = [
        "# Where a tree round's time goes", "",
        f"device {m['device_kind']} ({m['cpu_count']} cores), jax {m['jax']}, commit "
        f"{m['commit']}, {m['date']}; {load_note(m)}. "
        f"Models "
        f"from {m['runs']}, batch 1; ms per round (per step for plain), {m['rounds']} rounds "
        f"per call, median of {m['repeats']} interleaved repeats [min-max].", "",
        *table(report)]
    for unit in ("cpu_ms", "wall_ms"):
        lines += ["", f"{unit.split('_')[0]} time:"] + summary(report[unit])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
