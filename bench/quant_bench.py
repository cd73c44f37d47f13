"""Decode speed and memory of weight-only quantisation and the int8 KV cache.

    .venv/bin/python bench/quant_bench.py [--configs 50m,100m] [--batch 1] [--repeats 5]
        [--new-tokens 32]

Random Llama weights (float32 master copy) decoded greedily with EOS ignored, one row per
contender: ``fp32`` and ``bf16`` weights and compute, ``int8`` / ``int4`` weights
(:mod:`cadenza.models.quant`, the default targets: every projection but lm_head, which
stays float32 like the embedding; float32 compute), and
``int8`` weights with the int8 KV cache (``decode.kv_cache=int8``), plus fp32 weights with
the int8 cache. Contenders are interleaved round by round (the order rotates); per row the
median seconds per decode step over ``--repeats`` rounds with its spread, tokens/s, the
bytes of the params and of the KV cache, and the weight bytes read per step divided by the
step time, next to the host's copy bandwidth measured in the same run (median of 5 reads
of a 256 MiB float32 array). ``agree`` is the fraction of greedy tokens equal to fp32's
(random weights: near-ties make this a weak accuracy signal).
Writes ``bench/results/<device>/quant_bench.{json,md}``.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cadenza.config import load_config
from cadenza.decode import DecodeConfig, generate
from cadenza.models import KVCache, Transformer, init_params
from cadenza.models.quant import quantize_params
from cadenza.provenance import provenance, results_dir

CONFIGS = {
    "50m": ["model.vocab_size=32000", "model.hidden_size=512", "model.num_layers=8",
            "model.num_heads=8", "model.num_kv_heads=4", "model.intermediate_size=1536"],
    "100m": ["model.vocab_size=32000", "model.hidden_size=768", "model.num_layers=10",
             "model.num_heads=12", "model.num_kv_heads=4", "model.intermediate_size=2048"],
}
# name -> (weight scheme, compute/param dtype, kv cache)
CONTENDERS = {"fp32": ("none", "float32", "auto"), "bf16": ("none", "bfloat16", "auto"),
              "int8": ("int8", "float32", "auto"), "int4": ("int4", "float32", "auto"),
              "int8+kv8": ("int8", "float32", "int8"), "fp32+kv8": ("none", "float32", "int8")}


def copy_bandwidth(repeats: int = 5) -> dict:
    """Bytes/s of reading a 256 MiB float32 array (a jitted sum), median and spread."""
    x = jnp.ones((64 << 20,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        rates.append(x.nbytes / (time.perf_counter() - t))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def nbytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def contender(cfg, params, scheme, dtype, kv):
    """``(model, params, decode kv_cache)`` for one contender."""
    c = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype, weight_quant=scheme)
    p = jax.tree.map(lambda a: a.astype(dtype), params)
    return Transformer(c), quantize_params(p, c), kv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="50m,100m")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = ap.parse_args(argv)
    base = DecodeConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    bandwidth = copy_bandwidth()
    rows = []
    for name in args.configs.split(","):
        cfg = load_config(None, CONFIGS[name], preset="tiny").model
        params = init_params(cfg, jax.random.key(0))
        prompts = np.random.default_rng(0).integers(
            3, cfg.vocab_size, (args.batch, args.prompt_len)).tolist()
        runs = {k: contender(cfg, params, *v) for k, v in CONTENDERS.items()}
        max_len = args.prompt_len + args.new_tokens
        tokens, times = {}, {k: [] for k in runs}
        for k, (m, p, kv) in runs.items():      # compile (and the tokens) outside the timing
            tokens[k] = generate(m, p, prompts, dataclasses.replace(base, kv_cache=kv)).token_ids
        names = list(runs)
        for i in range(args.repeats):           # interleaved, the order rotating
            for k in names[i % len(names):] + names[:i % len(names)]:
                m, p, kv = runs[k]
                r = generate(m, p, prompts, dataclasses.replace(base, kv_cache=kv))
                times[k].append(r.stats["decode_s"] / max(r.stats["steps"], 1))
        ref = np.asarray(tokens["fp32"])
        for k, (m, p, kv) in runs.items():
            ts = times[k]
            step = statistics.median(ts)
            cache = KVCache.create(m.config, args.batch, max_len, None if kv == "auto" else kv)
            wbytes = nbytes(p) - nbytes(p["embed"])     # an embedding row per token is read
            rows.append({
                "config": name, "params": cfg.num_params(), "contender": k,
                "weights": CONTENDERS[k][0], "dtype": CONTENDERS[k][1], "kv_cache": kv,
                "step_ms": {"median": step * 1e3, "min": min(ts) * 1e3, "max": max(ts) * 1e3},
                "tokens_per_s": args.batch / step, "param_bytes": nbytes(p),
                "weight_bytes_per_step": wbytes, "kv_cache_bytes": cache.nbytes,
                "weight_bytes_per_s": wbytes / step,
                "agree_with_fp32": float(np.mean(np.asarray(tokens[k]) == ref))})
            print(json.dumps(rows[-1]), flush=True)
    meta = {**provenance(), "batch": args.batch, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "repeats": args.repeats,
            "copy_bandwidth_bytes_per_s": bandwidth}
    out = results_dir(__file__, args.out)
    (out / "quant_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2)
                                          + "\n")
    gb = 1e9
    lines = ["# Quantised decoding: weight-only int8/int4 and the int8 KV cache (greedy, random "
             "weights)", "",
             f"jax {meta['jax']}, commit {meta['commit']}, {meta['date']}, {meta['device_kind']},"
             f" {meta['cpu_count']} CPU cores, host load average {meta['load_avg_1m']:.1f} at "
             f"the end (the machine is shared with other jobs: absolute times are noisy; the "
             f"contenders are interleaved). Batch {args.batch}, {args.prompt_len}-token prompt, "
             f"{args.new_tokens} new tokens, medians of {args.repeats} rounds [min-max]. "
             f"Measured read bandwidth: {bandwidth['median'] / gb:.1f} GB/s "
             f"[{bandwidth['min'] / gb:.1f}-{bandwidth['max'] / gb:.1f}].", "",
             "| config | params | contender | ms/step | tokens/s | param MiB | KV cache KiB | "
             "weight GB/s read | agree with fp32 |", "|" + "---|" * 9]
    for r in rows:
        s = r["step_ms"]
        lines.append(f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['contender']} | "
                     f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}] | "
                     f"{r['tokens_per_s']:.1f} | {r['param_bytes'] / 2**20:.1f} | "
                     f"{r['kv_cache_bytes'] / 2**10:.0f} | {r['weight_bytes_per_s'] / gb:.2f} | "
                     f"{r['agree_with_fp32']:.2f} |")
    (out / "quant_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
