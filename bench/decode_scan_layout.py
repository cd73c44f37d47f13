"""Decode step time of a ``scan_layers`` model vs the same model unrolled.

    .venv/bin/python bench/decode_scan_layout.py [--configs 10m,100m] [--batches 1,8]
        [--repeats 5] [--new-tokens 32]

Same random float32 Llama weights in both layouts (the unrolled params are
``cadenza.models.unstack_layers`` of the scanned ones), greedy ``generate`` with EOS
ignored, the two layouts interleaved round by round (alternating which goes first). Per row:
median seconds per decode step (decode time / steps, prefill excluded) of each layout over
``--repeats`` rounds, with the spread, and the scanned / unrolled ratio (median of the
per-round ratios); the greedy tokens of both must agree, and ``same decode program`` says
whether one cached decode step lowers to identical HLO for both once
``cadenza.models.decode_layout`` (what ``generate`` applies) has run: on CPU the scanned
model decodes through the unrolled layout.
Writes ``bench/results/<device>/decode_scan_layout.{json,md}``.
"""

import argparse
import dataclasses
import json
import statistics
import sys

import jax
import numpy as np

from cadenza.config import load_config
from cadenza.decode import DecodeConfig, generate
from cadenza.models import KVCache, Transformer, decode_layout, init_params, unstack_layers
from cadenza.provenance import provenance, results_dir

CONFIGS = {
    "10m": ["model.vocab_size=8192", "model.hidden_size=320", "model.num_layers=6",
            "model.num_heads=5", "model.num_kv_heads=5", "model.intermediate_size=864"],
    "100m": ["model.vocab_size=32000", "model.hidden_size=768", "model.num_layers=10",
             "model.num_heads=12", "model.num_kv_heads=4", "model.intermediate_size=2048"],
}


def step_seconds(model, params, prompts, config) -> tuple[float, list]:
    """Seconds per decode step of one ``generate`` call, and its tokens."""
    r = generate(model, params, prompts, config)
    return r.stats["decode_s"] / max(r.stats["steps"], 1), r.token_ids


def same_step_program(layouts: dict, batch: int) -> bool:
    """Whether one cached decode step lowers to the same program for both layouts after
    :func:`cadenza.models.decode_layout` (what ``generate`` runs)."""
    texts = []
    for model, params in layouts.values():
        model, params = decode_layout(model, params)
        cache = KVCache.create(model.config, batch, 64)
        tokens = jax.numpy.zeros((batch, 1), jax.numpy.int32)
        step = jax.jit(lambda p, t, c, m=model: m.apply({"params": p}, t, cache=c))
        texts.append(step.lower(params, tokens, cache).as_text())
    return texts[0] == texts[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="10m,100m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = ap.parse_args(argv)
    config = DecodeConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    rows = []
    for name in args.configs.split(","):
        cfg = load_config(None, CONFIGS[name], preset="tiny").model
        params = init_params(cfg, jax.random.key(0))
        layouts = {"scanned": (Transformer(cfg), params),
                   "unrolled": (Transformer(dataclasses.replace(cfg, scan_layers=False)),
                                unstack_layers(params, cfg.num_layers))}
        rng = np.random.default_rng(0)
        for b in map(int, args.batches.split(",")):
            prompts = rng.integers(3, cfg.vocab_size, (b, args.prompt_len)).tolist()
            tokens = {k: step_seconds(m, p, prompts, config)[1] for k, (m, p) in layouts.items()}
            times = {k: [] for k in layouts}
            for i in range(args.repeats):    # alternate which layout goes first
                for k, (m, p) in sorted(layouts.items(), reverse=i % 2 == 1):
                    times[k].append(step_seconds(m, p, prompts, config)[0])
            ratios = [s / u for s, u in zip(times["scanned"], times["unrolled"])]
            row = {"config": name, "params": cfg.num_params(), "batch": b,
                   "tokens_equal": tokens["scanned"] == tokens["unrolled"],
                   "same_step_program": same_step_program(layouts, b),
                   "scanned_over_unrolled": statistics.median(ratios),
                   "ratio_min": min(ratios), "ratio_max": max(ratios)}
            for k, ts in times.items():
                row[f"{k}_step_ms"] = {"median": statistics.median(ts) * 1e3,
                                       "min": min(ts) * 1e3, "max": max(ts) * 1e3}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {**provenance(), "dtype": "float32", "method": "greedy",
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "repeats": args.repeats}
    out = results_dir(__file__, args.out)
    (out / "decode_scan_layout.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                            indent=2) + "\n")
    lines = ["# Decode step: scan_layers vs unrolled (greedy, float32, random weights)", "",
             f"jax {meta['jax']}, commit {meta['commit']}, {meta['date']}, {meta['device_kind']},"
             f" {meta['cpu_count']} CPU cores, host load average {meta['load_avg_1m']:.1f} at "
             f"the end (the machine is shared: absolute times are noisy; the layouts are "
             f"interleaved so the ratio is less so). Medians of {args.repeats} rounds [min-max].",
             "", "| config | params | batch | scanned ms/step | unrolled ms/step | "
             "scanned / unrolled | tokens equal | same decode program |", "|" + "---|" * 8]
    for r in rows:
        s, u = r["scanned_step_ms"], r["unrolled_step_ms"]
        lines.append(f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['batch']} | "
                     f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}] | "
                     f"{u['median']:.1f} [{u['min']:.1f}-{u['max']:.1f}] | "
                     f"{r['scanned_over_unrolled']:.2f} [{r['ratio_min']:.2f}-"
                     f"{r['ratio_max']:.2f}] | {r['tokens_equal']} | {r['same_step_program']} |")
    (out / "decode_scan_layout.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
