"""Decode step time of a multi-adapter batch vs the plain base model.

    .venv/bin/python bench/multi_lora_bench.py [--config 10m] [--batches 1,8]
        [--adapters 4] [--rank 8] [--repeats 5] [--new-tokens 32]

A bank of ``--adapters`` random LoRA adapters of rank ``--rank`` on every projection
(``cadenza.decode.multi_lora``) over random float32 Llama weights; greedy ``generate``
with EOS ignored. Contenders, interleaved round by round (the order rotates): the plain
base model, and the bank with every row on the base (adapter id -1), every row on one
adapter (rows sharing it: the gathered factors are copies of one adapter), and the rows
spread over all adapters. The three bank runs share one compiled program (only the ids
differ). Per row: median seconds per decode step (decode time / steps, prefill excluded)
over ``--repeats`` rounds with the spread, and the ratio to the plain model (median of the
per-round ratios). Writes ``bench/results/<device>/multi_lora_bench.{json,md}``.
"""

import argparse
import json
import statistics
import sys

import jax
import numpy as np

from cadenza.config import load_config
from cadenza.decode import DecodeConfig, driver, generate
from cadenza.decode.multi_lora import stack_adapters
from cadenza.models import Transformer, init_params
from cadenza.provenance import provenance, results_dir
from cadenza.train import peft

CONFIGS = {
    "10m": ["model.vocab_size=8192", "model.hidden_size=320", "model.num_layers=6",
            "model.num_heads=5", "model.num_kv_heads=5", "model.intermediate_size=864"],
    "100m": ["model.vocab_size=32000", "model.hidden_size=768", "model.num_layers=10",
             "model.num_heads=12", "model.num_kv_heads=4", "model.intermediate_size=2048"],
}


def make_bank(config_overrides, params, n: int, rank: int):
    """A bank of ``n`` adapters (rank ``rank``, every projection, random non-zero B)."""
    cfg = load_config(None, config_overrides + ["peft.method=lora", f"peft.rank={rank}",
                                                "peft.targets=.*_proj"], preset="tiny")
    adapters = []
    for i in range(n):
        pm, trainable, _ = peft.prepare(cfg, params, jax.random.key(i + 1))
        trainable = jax.tree.map(lambda x, i=i: x + 0.01 * jax.random.normal(
            jax.random.key(100 + i), x.shape), trainable)
        adapters.append((f"a{i}", pm, trainable))
    return stack_adapters(cfg.model, adapters)


def step_seconds(model, params, prompts, config) -> float:
    """Seconds per decode step of one ``generate`` call."""
    r = generate(model, params, prompts, config)
    return r.stats["decode_s"] / max(r.stats["steps"], 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="10m", choices=sorted(CONFIGS))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = ap.parse_args(argv)
    config = DecodeConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    cfg = load_config(None, CONFIGS[args.config], preset="tiny").model
    params = init_params(cfg, jax.random.key(0))
    bank = make_bank(CONFIGS[args.config], params, args.adapters, args.rank)
    rng = np.random.default_rng(0)
    rows = []
    for b in map(int, args.batches.split(",")):
        prompts = rng.integers(3, cfg.vocab_size, (b, args.prompt_len)).tolist()
        runs = {"plain": (Transformer(cfg), params),
                "bank, base rows": (bank.forward, bank.params(params, [None] * b)),
                "bank, one adapter": (bank.forward, bank.params(params, ["a0"] * b)),
                "bank, spread": (bank.forward, bank.params(
                    params, [bank.names[i % len(bank.names)] for i in range(b)]))}
        for m, p in runs.values():       # compile outside the timed rounds
            step_seconds(m, p, prompts, config)
        compiles = driver.COMPILES["count"]
        times = {k: [] for k in runs}
        names = list(runs)
        for i in range(args.repeats):
            for k in names[i % len(names):] + names[:i % len(names)]:
                times[k].append(step_seconds(*runs[k], prompts, config))
        row = {"batch": b, "recompiled": driver.COMPILES["count"] != compiles}
        for k, ts in times.items():
            ratios = [t / p for t, p in zip(ts, times["plain"])]
            row[k] = {"step_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                      "max_ms": max(ts) * 1e3, "over_plain": statistics.median(ratios),
                      "ratio_min": min(ratios), "ratio_max": max(ratios)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {**provenance(), "dtype": "float32", "method": "greedy", "config": args.config,
            "params": cfg.num_params(), "adapters": args.adapters, "rank": args.rank,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "repeats": args.repeats}
    out = results_dir(__file__, args.out)
    (out / "multi_lora_bench.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                          indent=2) + "\n")
    lines = [f"# Decode step: a bank of {args.adapters} LoRA adapters (rank {args.rank}, every "
             f"projection) vs the plain model ({args.config}, greedy, float32)", "",
             f"jax {meta['jax']}, commit {meta['commit']}, {meta['date']}, "
             f"{meta['device_kind']}, {meta['cpu_count']} CPU cores, host load average "
             f"{meta['load_avg_1m']:.1f} at the end (a shared machine: absolute times are "
             f"noisy; the contenders are interleaved). Medians of {args.repeats} rounds "
             "[min-max]; ratio: median of per-round ratios to plain.", "",
             "| batch | contender | ms/step | / plain |", "|---|---|---|---|"]
    for r in rows:
        for k in runs:
            c = r[k]
            lines.append(f"| {r['batch']} | {k} | {c['step_ms']:.2f} [{c['min_ms']:.2f}-"
                         f"{c['max_ms']:.2f}] | {c['over_plain']:.2f} [{c['ratio_min']:.2f}-"
                         f"{c['ratio_max']:.2f}] |")
    lines.append("")
    lines.append("Changing the rows' adapters recompiled: "
                 + ("yes" if any(r["recompiled"] for r in rows) else "no") + ".")
    (out / "multi_lora_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
