"""Decode throughput of ``cadenza.decode.generate`` vs transformers' ``generate``.

Greedy decoding of random-weight Llama models (the tiny preset and a ~100M
config) at batch 1 and 16, equal-length random prompts, EOS ignored. Both
sides get the same float32 weights: the cadenza params are exported with
``cadenza.models.save_hf`` and loaded by ``AutoModelForCausalLM`` in the reference
environment (``.venv-ref``, run as a subprocess). Reported per side: prefill seconds and
decode tokens/s (tokens made by decode steps / decode seconds; transformers'
decode time is its generate time minus a separately timed prefill forward),
plus whether the greedy tokens agree.

    .venv/bin/python bench/decode_throughput.py [--configs tiny,100m] [--no-hf]

Writes ``bench/results/<device>/decode_throughput.{json,md}``.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import numpy as np

from cadenza.config import load_config
from cadenza.decode import DecodeConfig, generate
from cadenza.models import Transformer, init_params, save_hf
from cadenza.provenance import provenance, results_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {
    "tiny": [],
    "100m": ["model.vocab_size=32000", "model.hidden_size=768", "model.num_layers=10",
             "model.num_heads=12", "model.num_kv_heads=4", "model.intermediate_size=2048"],
}

HF_RUNNER = r"""
import json, sys, time
import numpy as np, torch
from transformers import AutoModelForCausalLM
spec = json.loads(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32,
                                             local_files_only=True, trust_remote_code=False)
model.eval()
out = []
with torch.inference_mode():
    for run in spec["runs"]:
        ids = torch.tensor(run["prompts"])
        n = run["new_tokens"]
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        model.generate(ids, **kw)                      # warm-up
        best_total, best_prefill = float("inf"), float("inf")
        for _ in range(run["repeats"]):
            t0 = time.perf_counter(); model(ids, use_cache=True)
            best_prefill = min(best_prefill, time.perf_counter() - t0)
            t0 = time.perf_counter(); gen = model.generate(ids, **kw)
            best_total = min(best_total, time.perf_counter() - t0)
        decode_s = max(best_total - best_prefill, 1e-9)
        out.append({"prefill_s": best_prefill, "total_s": best_total,
                    "decode_tokens_per_s": ids.shape[0] * (n - 1) / decode_s,
                    "tokens": gen[:, ids.shape[1]:].tolist(), "threads": torch.get_num_threads()})
print(json.dumps(out))
"""


def bench_cadenza(model, params, prompts, new_tokens, repeats):
    config = DecodeConfig(max_new_tokens=new_tokens, ignore_eos=True)
    first = generate(model, params, prompts, config)                 # compiles
    runs = [generate(model, params, prompts, config) for _ in range(repeats)]
    best = max(runs, key=lambda r: r.stats["decode_tokens_per_s"])
    return {"compile_s": first.stats["compile_s"],
            "prefill_s": min(r.stats["prefill_s"] for r in runs),
            "decode_tokens_per_s": best.stats["decode_tokens_per_s"],
            "steps": best.stats["steps"]}, best.token_ids


def run_hf(hf_dir, runs):
    python = ROOT / ".venv-ref" / "bin" / "python"
    if not python.exists():
        raise SystemExit("reference env missing: run `make ref-env` (or pass --no-hf)")
    spec = {"hf_dir": str(hf_dir), "runs": runs}
    proc = subprocess.run([str(python), "-c", HF_RUNNER, json.dumps(spec)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"transformers runner failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="tiny,100m")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = ap.parse_args(argv)

    rows = []
    for name in args.configs.split(","):
        cfg = load_config(None, CONFIGS[name], preset="tiny").model
        params = init_params(cfg, jax.random.key(0))
        n_params = sum(x.size for x in jax.tree.leaves(params))
        model = Transformer(cfg)
        rng = np.random.default_rng(0)
        cases = []
        for b in map(int, args.batches.split(",")):
            prompts = rng.integers(3, cfg.vocab_size, (b, args.prompt_len)).tolist()
            ours, tokens = bench_cadenza(model, params, prompts, args.new_tokens, args.repeats)
            cases.append({"batch": b, "prompts": prompts, "cadenza": ours, "tokens": tokens})
            print(f"{name} b={b}: cadenza {ours['decode_tokens_per_s']:.1f} tok/s", flush=True)
        if not args.no_hf:
            with tempfile.TemporaryDirectory() as tmp:
                hf_dir = save_hf((cfg, params), pathlib.Path(tmp) / "hf")
                hf = run_hf(hf_dir, [{"prompts": c["prompts"], "new_tokens": args.new_tokens,
                                         "repeats": args.repeats} for c in cases])
            for c, h in zip(cases, hf):
                c["transformers"] = {k: v for k, v in h.items() if k != "tokens"}
                c["greedy_tokens_equal"] = c["tokens"] == h["tokens"]
                print(f"{name} b={c['batch']}: transformers {h['decode_tokens_per_s']:.1f} tok/s,"
                      f" tokens equal: {c['greedy_tokens_equal']}", flush=True)
        for c in cases:
            rows.append({"config": name, "params": int(n_params), "batch": c["batch"],
                         "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                         **{k: c[k] for k in ("cadenza", "transformers", "greedy_tokens_equal")
                            if k in c}})

    meta = {**provenance(ROOT), "dtype": "float32", "method": "greedy"}
    out = results_dir(__file__, args.out)
    (out / "decode_throughput.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                           indent=2) + "\n")
    lines = ["# Decode throughput (greedy, float32, random weights)", "",
             ", ".join(f"{k}: {v}" for k, v in meta.items()), "",
             "| config | params | batch | cadenza decode tok/s | transformers decode tok/s | "
             "cadenza prefill ms | transformers prefill ms | cadenza compile s | "
             "greedy tokens equal |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hf = r.get("transformers", {})
        fmt = lambda v, s=1.0: f"{v * s:.1f}" if v is not None else "-"  # noqa: E731
        lines.append(f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['batch']} | "
                     f"{fmt(r['cadenza']['decode_tokens_per_s'])} | "
                     f"{fmt(hf.get('decode_tokens_per_s'))} | "
                     f"{fmt(r['cadenza']['prefill_s'], 1e3)} | {fmt(hf.get('prefill_s'), 1e3)} | "
                     f"{fmt(r['cadenza']['compile_s'])} | {r.get('greedy_tokens_equal', '-')} |")
    (out / "decode_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
