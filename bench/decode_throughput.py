"""Decode throughput of ``cadenza.decode.generate`` vs transformers' ``generate``.

Greedy decoding of random-weight Llama models (the tiny preset and a ~100M
config; ``1b``, ~1.1B params, for accelerators) at batch 1 and 16, equal-length
random prompts, EOS ignored. Both sides get the same weights: the cadenza params
are exported in float32 with ``cadenza.models.save_hf`` and loaded by
``AutoModelForCausalLM`` in ``--dtype`` (float32 or bfloat16, both sides) by the
``--hf-python`` interpreter (default the reference environment ``.venv-ref``; on a
GPU machine whose python has torch, that python), run as a subprocess, on the GPU
when torch sees one. Reported per side: prefill seconds and decode tokens/s
(tokens made by decode steps / decode seconds; transformers' decode time is its
generate time minus a separately timed prefill forward), whether the greedy tokens
agree, and, where the device's peak HBM bandwidth is known
(``cadenza.train.metrics.peak_hbm_bytes_per_s``), the fraction of the HBM roofline:
bytes a decode step must read (all params + the KV cache at the mean context
length) per step time, over the peak.

    .venv/bin/python bench/decode_throughput.py [--configs tiny,100m] [--no-hf]
        [--dtype bfloat16] [--hf-python PYTHON]

Writes ``bench/results/<device>/decode_throughput.{json,md}``.
"""

import argparse
import dataclasses
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
from cadenza.train.metrics import peak_hbm_bytes_per_s

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {
    "tiny": [],
    "100m": ["model.vocab_size=32000", "model.hidden_size=768", "model.num_layers=10",
             "model.num_heads=12", "model.num_kv_heads=4", "model.intermediate_size=2048"],
    "1b": ["model.vocab_size=32000", "model.hidden_size=2048", "model.num_layers=16",
           "model.num_heads=32", "model.num_kv_heads=8", "model.intermediate_size=8192"],
}

HF_RUNNER = r"""
import json, sys, time
import numpy as np, torch
from transformers import AutoModelForCausalLM
spec = json.loads(sys.argv[1])
device = "cuda" if torch.cuda.is_available() else "cpu"
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=getattr(torch, spec["dtype"]),
                                             local_files_only=True, trust_remote_code=False)
model.to(device).eval()
out = []
with torch.inference_mode():
    for run in spec["runs"]:
        ids = torch.tensor(run["prompts"], device=device)
        n = run["new_tokens"]
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        model.generate(ids, **kw)                      # warm-up
        best_total, best_prefill = float("inf"), float("inf")
        for _ in range(run["repeats"]):
            sync(); t0 = time.perf_counter(); model(ids, use_cache=True); sync()
            best_prefill = min(best_prefill, time.perf_counter() - t0)
            t0 = time.perf_counter(); gen = model.generate(ids, **kw); sync()
            best_total = min(best_total, time.perf_counter() - t0)
        decode_s = max(best_total - best_prefill, 1e-9)
        out.append({"prefill_s": best_prefill, "total_s": best_total,
                    "decode_tokens_per_s": ids.shape[0] * (n - 1) / decode_s,
                    "tokens": gen[:, ids.shape[1]:].tolist(), "threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"})
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


def run_hf(hf_dir, runs, dtype, python=None):
    """transformers' generate on ``runs`` (the HF_RUNNER script) by ``python`` (default
    the reference env), weights loaded in ``dtype``; its per-run JSON rows."""
    python = pathlib.Path(python) if python else ROOT / ".venv-ref" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} missing: run `make ref-env`, pass --hf-python, or --no-hf")
    spec = {"hf_dir": str(hf_dir), "runs": runs, "dtype": dtype}
    proc = subprocess.run([str(python), "-c", HF_RUNNER, json.dumps(spec)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"transformers runner failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def decode_step_bytes(cfg, n_params: int, batch: int, context: int) -> int:
    """Bytes one decode step must read from memory at least: every param once, plus the
    K and V cache of ``batch`` rows at ``context`` tokens (``cfg``'s dtype)."""
    item = jax.numpy.dtype(cfg.dtype).itemsize
    kv = 2 * batch * context * cfg.num_layers * cfg.num_kv_heads * cfg.resolved_head_dim * item
    return n_params * item + kv


def roofline_fraction(step_bytes: int, steps_per_s: float, peak: float | None):
    """Achieved bytes/s (``step_bytes`` x steps/s) over the peak HBM bandwidth; None
    without a peak."""
    return None if peak is None else step_bytes * steps_per_s / peak


def config_rows(name, cfg, n_params: int, cases: list[dict], args, peak) -> list[dict]:
    """One results row per batch of ``cases`` (one config), with the HBM roofline fraction
    of each side measured so far."""
    rows = []
    for c in cases:
        step_bytes = decode_step_bytes(cfg, n_params, c["batch"],
                                       args.prompt_len + args.new_tokens // 2)
        for side in ("cadenza", "transformers"):
            if side in c:
                c[side]["hbm_roofline_fraction"] = roofline_fraction(
                    step_bytes, c[side]["decode_tokens_per_s"] / c["batch"], peak)
        rows.append({"config": name, "params": n_params, "batch": c["batch"],
                     "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "step_bytes": step_bytes,
                     **{k: c[k] for k in ("cadenza", "transformers", "greedy_tokens_equal")
                        if k in c}})
    return rows


def write_results(rows: list[dict], args, peak) -> None:
    """decode_throughput.{json,md} under the results folder, stamped."""
    meta = {**provenance(ROOT), "dtype": args.dtype, "method": "greedy",
            "overrides": args.override,
            "peak_hbm_bytes_per_s": peak}
    out = results_dir(__file__, args.out)
    (out / "decode_throughput.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                           indent=2) + "\n")
    lines = [f"# Decode throughput (greedy, {args.dtype}, random weights)", "",
             ", ".join(f"{k}: {v}" for k, v in meta.items()), "",
             "| config | params | batch | cadenza decode tok/s | transformers decode tok/s | "
             "cadenza prefill ms | transformers prefill ms | cadenza compile s | "
             "greedy tokens equal | cadenza HBM roofline | transformers HBM roofline |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hf = r.get("transformers", {})
        fmt = lambda v, s=1.0: f"{v * s:.1f}" if v is not None else "-"  # noqa: E731
        pct = lambda v: f"{v:.0%}" if v is not None else "n/a"  # noqa: E731
        lines.append(f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['batch']} | "
                     f"{fmt(r['cadenza']['decode_tokens_per_s'])} | "
                     f"{fmt(hf.get('decode_tokens_per_s'))} | "
                     f"{fmt(r['cadenza']['prefill_s'], 1e3)} | {fmt(hf.get('prefill_s'), 1e3)} | "
                     f"{fmt(r['cadenza']['compile_s'])} | {r.get('greedy_tokens_equal', '-')} | "
                     f"{pct(r['cadenza'].get('hbm_roofline_fraction'))} | "
                     f"{pct(hf.get('hbm_roofline_fraction'))} |")
    (out / "decode_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="tiny,100m")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute and weight dtype of both sides")
    ap.add_argument("--hf-python", default=None,
                    help="python with torch + transformers (default .venv-ref/bin/python)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every model, e.g. model.attention_impl=xla")
    ap.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = ap.parse_args(argv)
    peak = peak_hbm_bytes_per_s(jax.devices()[0])

    rows = []
    for name in args.configs.split(","):
        cfg32 = load_config(None, CONFIGS[name] + args.override, preset="tiny").model
        params32 = init_params(cfg32, jax.random.key(0))
        n_params = sum(x.size for x in jax.tree.leaves(params32))
        cfg = dataclasses.replace(cfg32, dtype=args.dtype, param_dtype=args.dtype)
        params = jax.tree.map(lambda x: x.astype(args.dtype), params32)
        model = Transformer(cfg)
        rng = np.random.default_rng(0)
        cases = []
        for b in map(int, args.batches.split(",")):
            prompts = rng.integers(3, cfg.vocab_size, (b, args.prompt_len)).tolist()
            ours, tokens = bench_cadenza(model, params, prompts, args.new_tokens, args.repeats)
            cases.append({"batch": b, "prompts": prompts, "cadenza": ours, "tokens": tokens})
            print(f"{name} b={b}: cadenza {ours['decode_tokens_per_s']:.1f} tok/s", flush=True)
        # written now too, so a run stopped during the transformers side keeps these rows
        write_results(rows + config_rows(name, cfg, int(n_params), cases, args, peak), args,
                      peak)
        if not args.no_hf:
            with tempfile.TemporaryDirectory() as tmp:
                hf_dir = save_hf((cfg32, params32), pathlib.Path(tmp) / "hf")
                hf = run_hf(hf_dir, [{"prompts": c["prompts"], "new_tokens": args.new_tokens,
                                         "repeats": args.repeats} for c in cases],
                            args.dtype, args.hf_python)
            for c, h in zip(cases, hf):
                c["transformers"] = {k: v for k, v in h.items() if k != "tokens"}
                c["greedy_tokens_equal"] = c["tokens"] == h["tokens"]
                print(f"{name} b={c['batch']}: transformers {h['decode_tokens_per_s']:.1f} tok/s,"
                      f" tokens equal: {c['greedy_tokens_equal']}", flush=True)
        rows += config_rows(name, cfg, int(n_params), cases, args, peak)
    write_results(rows, args, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
