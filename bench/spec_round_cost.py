"""What one speculative round costs next to a bare cached forward over as many tokens.

Run: ``.venv/bin/python bench/spec_round_cost.py [--runs runs/spec_methods/20m]`` after
``bench/speculative_methods.py`` has trained and cached its models there (nothing is trained
here). Greedy rows of that script (plain greedy, the distilled draft at gamma 4, prompt
lookup gamma 4, Hydra, Token Recycling) decode ``--prompts`` held-out prompts, one per call,
128 new tokens; interleaved with them, ``forward_ms(T)`` times a cached forward over the
round's verify size T (the layout decoding uses). Reported per row: ms per target forward
(decode seconds / target forwards), its ratio to ``fwd(T)`` (1.0 = the round costs just its
verify forward; the rest is drafting and bookkeeping) and the identity with plain greedy;
medians of ``--repeats`` interleaved repeats with min and max.

Results: ``bench/results/<device>/spec_round_cost.{json,md}`` (stamped).
"""

import argparse
import json
import os
import pathlib
import statistics

from speculative_methods import build_rows, decode, forward_ms, heldout_prompts

from cadenza.decode.hydra import Hydra
from cadenza.decode.medusa import Medusa, load_tree_heads
from cadenza.models import Transformer, load_model
from cadenza.models.checkpoint import tokenizer_dir
from cadenza.models.tokenizer import load_tokenizer
from cadenza.provenance import load_note, provenance, results_dir

# row name -> verify tokens per round (tree nodes + the pending token)
ROWS = {"plain greedy": 1, "draft model (distilled) gamma=4": 5, "prompt lookup gamma=4": 5,
        "Hydra (9-node tree)": 10, "recycling (defaults)": 16}


def model_dir(runs: pathlib.Path, prefix: str) -> pathlib.Path:
    """The cached ``<runs>/<prefix>*/model`` (exactly one), else SystemExit."""
    found = sorted(runs.glob(f"{prefix}*/model"))
    if len(found) != 1:
        raise SystemExit(f"expected one {prefix}*/model under {runs}, found {len(found)}: "
                         "run bench/speculative_methods.py first")
    return found[0]


def load_target(runs, n_prompts):
    """The cached target under ``runs``: ``(config, params, n_prompts held-out prompts of 64
    tokens)``."""
    tdir = model_dir(runs, "target")
    tcfg, tparams = load_model(tdir)
    prompts, _ = heldout_prompts(load_tokenizer(tokenizer_dir(tdir)),
                                 tcfg.data.heldout_fraction, n_prompts, 64)
    return tcfg, tparams, prompts


def load_pair(runs, draft, n_prompts):
    """The cached target and the draft under ``runs`` (a run-directory prefix):
    ``(target config, target params, draft config, draft params, n_prompts held-out
    prompts of 64 tokens)``."""
    tcfg, tparams, prompts = load_target(runs, n_prompts)
    dcfg, dparams = load_model(model_dir(runs, draft))
    return tcfg, tparams, dcfg, dparams, prompts


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/spec_methods/20m")
    p.add_argument("--draft", default="draft-distilled-150",
                   help="the distilled draft's run-directory prefix under --runs (the runs "
                        "before 2026-12-06: draft-distilled-200)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = p.parse_args()
    runs, load_start = pathlib.Path(args.runs), os.getloadavg()[0]
    tcfg, tparams, dcfg, dparams, prompts = load_pair(runs, args.draft, 8)
    target = Transformer(tcfg.model)
    prompts = prompts[::max(len(prompts) // args.prompts, 1)][:args.prompts]
    heads = (load_tree_heads(runs / "medusa-heads-200", tcfg.model, Medusa),
             load_tree_heads(runs / "hydra-heads-200", tcfg.model, Hydra))
    ns = argparse.Namespace(gammas=[4], max_gamma=6, ngram_gammas=[4], modes=["greedy"])
    rows = [r for r in build_rows(ns, target, tparams, {"distilled": (dcfg.model, dparams, 0.0)},
                                  heads, (None, None), (), 128)
            if r.mode == "greedy" and r.name in ROWS]
    ids = {r.name: decode(target, tparams, r, prompts)[0] for r in rows}   # warm-up
    sizes = sorted(set(ROWS.values()))
    fwd = {t: [] for t in sizes}
    per_round = {r.name: [] for r in rows}
    for _ in range(args.repeats):
        for t in sizes:
            fwd[t].append(forward_ms(target, tparams, t, 128, 1))
        for r in rows:
            _, secs, _, stats = decode(target, tparams, r, prompts)
            rounds = sum(s.get("target_forwards", s["steps"]) for s in stats)
            per_round[r.name].append(secs / rounds * 1e3)

    def spread(v):
        return {"median": statistics.median(v), "min": min(v), "max": max(v)}

    results = [{"method": name, "verify_tokens": ROWS[name], "ms_per_round": spread(v),
                "round_over_fwd": statistics.median(v) / statistics.median(fwd[ROWS[name]]),
                "identical_to_greedy": ids[name] == ids["plain greedy"]}
               for name, v in per_round.items()]
    report = {"meta": {"benchmark": "spec_round_cost", **provenance(),
                       "load_avg_1m_start": load_start, "prompts": len(prompts),
                       "repeats": args.repeats, "runs": str(runs)},
              "forward_ms": {t: spread(v) for t, v in fwd.items()}, "rows": results}
    out = results_dir(__file__, args.out)
    (out / "spec_round_cost.json").write_text(json.dumps(report, indent=2))
    (out / "spec_round_cost.md").write_text(render(report))
    print(render(report))


def render(report: dict) -> str:
    m, f = report["meta"], report["forward_ms"]
    lines = [
        "# A speculative round next to a bare forward of its verify size", "",
        f"device {m['device_kind']} ({m['cpu_count']} cores), jax {m['jax']}, commit "
        f"{m['commit']}, {m['date']}; {load_note(m)}. "
        f"Models from {m['runs']}; {m['prompts']} held-out prompts, one per call, 128 new "
        f"tokens, greedy; median of {m['repeats']} interleaved repeats [min-max].", "",
        "| T | " + " | ".join(str(t) for t in f) + " |",
        "|---|" + "---|" * len(f),
        "| fwd(T) ms | " + " | ".join(f"{v['median']:.2f} [{v['min']:.2f}-{v['max']:.2f}]"
                                     for v in f.values()) + " |", "",
        "| method | T | ms per round [min-max] | round / fwd(T) | identical to greedy |",
        "|---|---|---|---|---|"]
    for r in report["rows"]:
        s = r["ms_per_round"]
        lines.append(f"| {r['method']} | {r['verify_tokens']} | {s['median']:.2f} "
                     f"[{s['min']:.2f}-{s['max']:.2f}] | {r['round_over_fwd']:.2f} | "
                     f"{r['identical_to_greedy']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
