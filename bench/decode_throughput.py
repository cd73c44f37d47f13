"""Decode throughput of ``cadenza.decode.generate`` vs transformers' ``generate``, interleaved.

Greedy decoding of random-weight Llama models (``10m``, ``50m``, ``150m``; ``1b``, ~1.1B
params, for accelerators) at batch 1 and 8, float32 and bfloat16, equal-length random
prompts, EOS ignored. Both sides get the same weights: the cadenza params are exported in
float32 with ``cadenza.models.save_hf`` and loaded by ``AutoModelForCausalLM`` in the
compute dtype by the ``--hf-python`` interpreter (default the reference environment
``.venv-ref``; on a GPU machine whose python has torch, that python), a subprocess kept
alive for the whole run (2 threads on CPU, ``OMP_WAIT_POLICY=PASSIVE`` so its idle
OpenMP threads do not spin on the shared cores).

transformers runs each of its paths: ``dynamic`` (``generate``'s default cache),
``static`` (``cache_implementation="static"``) and ``compiled`` (static cache plus
``torch.compile`` of the decode forward; on CPU through a ``CompileConfig`` flagged to
compile on every device); its best path per case is the one with the highest median
decode tokens/s, chosen after the run.

Fairness: every case (size, dtype, batch) is warmed up (compiled) on every contender
first, then ``--repeats`` rounds each time cadenza, then every transformers path, then a
memory-bandwidth probe, in the same round, so all see the same machine load. Reported:
medians over the rounds with [min-max]. Decode tokens/s: tokens made by decode steps /
decode seconds (cadenza: its decode loop; transformers: its ``generate`` time minus a
separately timed prefill forward in the same round); end-to-end tokens/s: all new tokens
/ the whole ``generate`` call. The speed ratio is the median of the per-round ratios of
cadenza to transformers' best path.

Roofline: a decode step must read every weight once except the embedding table (one row
per token) and the KV cache at the mean context length; bytes per step x steps/s over
the memory bandwidth measured in the same rounds (the fastest round of the faster of a
JAX and a torch reduction over a 256 MiB float32 array: the best read bandwidth either
stack reached, as a roofline is a ceiling) is each side's fraction of that roofline.
Greedy tokens are compared row for row; where they differ (bfloat16 rounding differs
between the two stacks), the first differing step is reported.

    .venv/bin/python bench/decode_throughput.py [--configs 10m,50m,150m] [--batches 1,8]
        [--dtypes float32,bfloat16] [--repeats 5] [--no-hf] [--hf-modes dynamic,static,compiled]
        [--hf-python PYTHON] [--name decode_throughput]

Writes ``bench/results/<device>/<name>.{json,md}``.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from cadenza.config import load_config
from cadenza.decode import DecodeConfig, generate
from cadenza.models import Transformer, init_params, save_hf
from cadenza.provenance import provenance, results_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {   # Llama-style, untied embeddings
    "tiny": [],
    "10m": ["model.vocab_size=8192", "model.hidden_size=320", "model.num_layers=6",
            "model.num_heads=5", "model.num_kv_heads=5", "model.intermediate_size=864"],
    "50m": ["model.vocab_size=16384", "model.hidden_size=512", "model.num_layers=8",
            "model.num_heads=8", "model.num_kv_heads=8", "model.intermediate_size=1376"],
    "150m": ["model.vocab_size=32000", "model.hidden_size=768", "model.num_layers=14",
             "model.num_heads=12", "model.num_kv_heads=12", "model.intermediate_size=2048"],
    "1b": ["model.vocab_size=32000", "model.hidden_size=2048", "model.num_layers=16",
           "model.num_heads=32", "model.num_kv_heads=8", "model.intermediate_size=8192"],
}
HF_MODES = ("dynamic", "static", "compiled")
PROBE_BYTES = 256 * 2**20

HF_RUNNER = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
from transformers.generation import CompileConfig
spec = json.loads(sys.argv[1])
device = "cuda" if torch.cuda.is_available() else "cpu"
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=getattr(torch, spec["dtype"]),
                                             local_files_only=True, trust_remote_code=False)
model.to(device).eval()
probe = torch.ones(spec["probe_bytes"] // 4, device=device)
compile_config = CompileConfig(mode="reduce-overhead" if device == "cuda" else "default")
compile_config._compile_all_devices = True     # generate compiles only on accelerators unless
KW = {"dynamic": {}, "static": {"cache_implementation": "static", "disable_compile": True},
      "compiled": {"cache_implementation": "static", "compile_config": compile_config}}

def run(case, mode):
    ids = torch.tensor(case["prompts"], device=device)
    n = case["new_tokens"]
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **KW[mode])
    with torch.inference_mode():
        sync(); t0 = time.perf_counter(); model(ids, use_cache=True); sync()
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter(); gen = model.generate(ids, **kw); sync()
        total = time.perf_counter() - t0
    return {"prefill_s": prefill, "total_s": total, "tokens": gen[:, ids.shape[1]:].tolist()}

def bandwidth():
    sync(); t0 = time.perf_counter(); probe.sum().item()
    return spec["probe_bytes"] / (time.perf_counter() - t0)

name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
print(json.dumps({"ready": True, "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "device": name}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    out = run(req["case"], req["mode"]) if "mode" in req else {"bandwidth": bandwidth()}
    print(json.dumps(out), flush=True)
"""


class HFSide:
    """transformers' ``generate`` in a long-lived subprocess that answers one timed call per
    request (the HF_RUNNER script), weights loaded from ``hf_dir`` in ``dtype``."""

    def __init__(self, hf_dir, dtype: str, python=None):
        python = pathlib.Path(python) if python else ROOT / ".venv-ref" / "bin" / "python"
        if not python.exists():
            raise SystemExit(f"{python} missing: run `make ref-env`, pass --hf-python, or --no-hf")
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE",
                   OMP_NUM_THREADS=str(os.cpu_count()), MKL_NUM_THREADS=str(os.cpu_count()))
        spec = {"hf_dir": str(hf_dir), "dtype": dtype, "probe_bytes": PROBE_BYTES}
        self.proc = subprocess.Popen([str(python), "-c", HF_RUNNER, json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        self.info = self._ask(None)

    def _ask(self, request) -> dict:
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the transformers runner exited ({self.proc.wait()})")
        return json.loads(line)

    def generate(self, case: dict, mode: str) -> dict:
        """One timed ``generate`` of ``case`` (prompts, new_tokens) on path ``mode``."""
        return self._ask({"case": case, "mode": mode})

    def bandwidth(self) -> float:
        """Bytes/s of one torch sum over the probe array."""
        return self._ask({})["bandwidth"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def jax_bandwidth(probe) -> float:
    """Bytes/s of one jitted sum over ``probe`` (compiled beforehand)."""
    t0 = time.perf_counter()
    jax.block_until_ready(_sum(probe))
    return probe.nbytes / (time.perf_counter() - t0)


_sum = jax.jit(jnp.sum)


def decode_step_bytes(cfg, n_params: int, batch: int, context: int) -> int:
    """Bytes one decode step must read at least, in ``cfg``'s dtype: every weight but the
    input embedding table, ``batch`` rows of that table, and the K and V cache of ``batch``
    rows at ``context`` tokens."""
    item = jnp.dtype(cfg.dtype).itemsize
    embed = cfg.vocab_size * cfg.hidden_size
    kv = 2 * batch * context * cfg.num_layers * cfg.num_kv_heads * cfg.resolved_head_dim
    return (n_params - embed + batch * cfg.hidden_size + kv) * item


def median_spread(values) -> dict:
    """{median, min, max} of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def first_difference(a: list[list[int]], b: list[list[int]]) -> int | None:
    """The first step at which any row of ``a`` and ``b`` differs; None if all equal."""
    steps = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None)
             for ra, rb in zip(a, b)]
    found = [s for s in steps if s is not None]
    return min(found) if found else None


def cadenza_round(model, params, case) -> dict:
    """One timed cadenza ``generate`` of ``case``."""
    config = DecodeConfig(max_new_tokens=case["new_tokens"], ignore_eos=True)
    r = generate(model, params, case["prompts"], config)
    return {"prefill_s": r.stats["prefill_s"], "total_s": r.stats["wall_s"],
            "decode_tokens_per_s": r.stats["decode_tokens_per_s"], "tokens": r.token_ids,
            "compile_s": r.stats["compile_s"]}


def hf_rates(r: dict, case: dict) -> dict:
    """Decode tokens/s of one transformers round (generate minus the prefill forward)."""
    b, n = len(case["prompts"]), case["new_tokens"]
    return {**r, "decode_tokens_per_s": b * (n - 1) / max(r["total_s"] - r["prefill_s"], 1e-9)}


def summarize(rounds: list[dict], case: dict, step_bytes: int, bandwidth: float) -> dict:
    """Medians [min-max] of one contender's rounds, its end-to-end rate and its share of
    the ``bandwidth`` roofline."""
    b, n = len(case["prompts"]), case["new_tokens"]
    dec = [r["decode_tokens_per_s"] for r in rounds]
    return {"decode_tokens_per_s": median_spread(dec),
            "e2e_tokens_per_s": median_spread([b * n / r["total_s"] for r in rounds]),
            "prefill_s": statistics.median(r["prefill_s"] for r in rounds),
            "roofline_fraction": step_bytes * statistics.median(dec) / b / bandwidth}


def bench_case(name, dtype, batch, args, model, params, cfg, n_params, hf) -> dict:
    """Warm every contender up on one case, then ``args.repeats`` interleaved rounds."""
    rng = np.random.default_rng(batch)
    case = {"prompts": rng.integers(3, cfg.vocab_size, (batch, args.prompt_len)).tolist(),
            "new_tokens": args.new_tokens}
    modes = [] if hf is None else args.hf_modes
    probe = jnp.ones(PROBE_BYTES // 4, jnp.float32)
    jax.block_until_ready(_sum(probe))
    warm = {"cadenza": cadenza_round(model, params, case)}
    for m in modes:
        t0 = time.perf_counter()
        warm[m] = {**hf.generate(case, m), "warmup_s": time.perf_counter() - t0}
    rounds = {k: [] for k in ["cadenza", *modes]}
    bws = []
    for i in range(args.repeats):
        rounds["cadenza"].append(cadenza_round(model, params, case))
        for m in modes:
            rounds[m].append(hf_rates(hf.generate(case, m), case))
        bws.append(max([jax_bandwidth(probe)] + ([hf.bandwidth()] if hf else [])))
        print(f"  {name} {dtype} b={batch} round {i + 1}: " + ", ".join(
            f"{k} {v[-1]['decode_tokens_per_s']:.1f}" for k, v in rounds.items())
            + f" tok/s, {bws[-1] / 1e9:.1f} GB/s", flush=True)
    bandwidth = max(bws)
    step_bytes = decode_step_bytes(cfg, n_params, batch, args.prompt_len + args.new_tokens // 2)
    row = {"config": name, "params": n_params, "dtype": dtype, "batch": batch,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "step_bytes": step_bytes, "bandwidth_bytes_per_s": median_spread(bws),
           "load_avg_1m": os.getloadavg()[0],
           "cadenza": {**summarize(rounds["cadenza"], case, step_bytes, bandwidth),
                       "compile_s": warm["cadenza"]["compile_s"]}}
    if modes:
        row["transformers"] = {m: {**summarize(rounds[m], case, step_bytes, bandwidth),
                                   "warmup_s": warm[m]["warmup_s"]} for m in modes}
        best = max(modes, key=lambda m: row["transformers"][m]["decode_tokens_per_s"]["median"])
        row["transformers_best"] = best
        row["speedup_vs_best"] = median_spread(
            [c["decode_tokens_per_s"] / h["decode_tokens_per_s"]
             for c, h in zip(rounds["cadenza"], rounds[best])])
        ours = rounds["cadenza"][-1]["tokens"]
        diffs = {m: first_difference(ours, rounds[m][-1]["tokens"]) for m in modes}
        row["greedy_tokens_equal"] = all(d is None for d in diffs.values())
        row["first_difference_step"] = diffs
    return row


def fmt_spread(s: dict, digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def markdown(meta: dict, rows: list[dict]) -> str:
    """The results table: one line per (size, dtype, batch)."""
    lines = ["# Decode throughput (greedy, random weights): cadenza vs transformers", "",
             ", ".join(f"{k}: {v}" for k, v in meta.items()), "",
             f"Medians of {meta['repeats']} interleaved rounds [min-max]; other jobs share "
             f"this machine (load_avg_1m above and per row), so absolute numbers are noisy and "
             f"the per-round ratio is the figure to read. transformers: best of its paths "
             f"(dynamic cache, static cache, static cache + torch.compile), 2 threads, "
             f"OMP_WAIT_POLICY=PASSIVE. Roofline: bytes a decode step must read / step time, "
             f"over the best read bandwidth measured in the same rounds (the bandwidth "
             f"column: median [min-max] over the rounds).", "",
             "| config | params | dtype | batch | cadenza decode tok/s | transformers best "
             "path | its decode tok/s | cadenza / transformers | cadenza roofline | "
             "transformers roofline | cadenza e2e tok/s | transformers e2e tok/s | "
             "greedy tokens | bandwidth GB/s | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["cadenza"]
        best = r.get("transformers_best")
        h = r["transformers"][best] if best else None
        diff = r.get("first_difference_step", {})
        if not diff:
            tokens = "-"
        elif r["greedy_tokens_equal"]:
            tokens = "equal"
        else:
            tokens = "differ from step " + ", ".join(
                f"{d} ({m})" for m, d in diff.items() if d is not None)
        bw = r["bandwidth_bytes_per_s"]
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['dtype']} | {r['batch']} | "
            f"{fmt_spread(c['decode_tokens_per_s'])} | {best or '-'} | "
            f"{fmt_spread(h['decode_tokens_per_s']) if h else '-'} | "
            f"{fmt_spread(r['speedup_vs_best'], 2) + 'x' if h else '-'} | "
            f"{c['roofline_fraction']:.0%} | {f'{h['roofline_fraction']:.0%}' if h else '-'} | "
            f"{c['e2e_tokens_per_s']['median']:.1f} | "
            f"{f'{h['e2e_tokens_per_s']['median']:.1f}' if h else '-'} | {tokens} | "
            f"{fmt_spread({k: v / 1e9 for k, v in bw.items()})} | {r['load_avg_1m']:.1f} |")
    if rows and rows[0].get("transformers"):
        lines += ["", "Every transformers path, median decode tok/s [min-max] (warm-up = the "
                  "first call, which compiles):", "",
                  "| config | dtype | batch | " + " | ".join(rows[0]["transformers"]) + " |",
                  "|---|---|---|" + "---|" * len(rows[0]["transformers"])]
        for r in rows:
            lines.append(f"| {r['config']} | {r['dtype']} | {r['batch']} | " + " | ".join(
                f"{fmt_spread(v['decode_tokens_per_s'])} (warm-up {v['warmup_s']:.1f} s)"
                for v in r["transformers"].values()) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], meta: dict, args) -> None:
    """``<name>.{json,md}`` under the results folder, stamped, written atomically."""
    out = results_dir(__file__, args.out)
    for suffix, text in ((".json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"),
                         (".md", markdown(meta, rows))):
        path = out / f"{args.name}{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="10m,50m,150m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--hf-modes", default=",".join(HF_MODES))
    ap.add_argument("--hf-python", default=None,
                    help="python with torch + transformers (default .venv-ref/bin/python)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every model, e.g. model.attention_impl=xla")
    ap.add_argument("--name", default="decode_throughput", help="results file stem")
    ap.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = ap.parse_args(argv)
    args.hf_modes = args.hf_modes.split(",")
    if unknown := set(args.hf_modes) - set(HF_MODES):
        ap.error(f"--hf-modes: unknown {sorted(unknown)}; choose from {list(HF_MODES)}")
    for name in args.configs.split(","):
        if name not in CONFIGS:
            ap.error(f"--configs: unknown {name!r}; choose from {list(CONFIGS)}")
    meta = {**provenance(ROOT), "method": "greedy", "repeats": args.repeats,
            "overrides": args.override}

    rows = []
    for name in args.configs.split(","):
        cfg32 = load_config(None, CONFIGS[name] + args.override, preset="tiny").model
        params32 = init_params(cfg32, jax.random.key(0))
        n_params = int(sum(x.size for x in jax.tree.leaves(params32)))
        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = None if args.no_hf else save_hf((cfg32, params32), pathlib.Path(tmp) / "hf")
            for dtype in args.dtypes.split(","):
                cfg = dataclasses.replace(cfg32, dtype=dtype, param_dtype=dtype)
                params = jax.tree.map(lambda x: x.astype(dtype), params32)
                hf = None if args.no_hf else HFSide(hf_dir, dtype, args.hf_python)
                if hf:
                    meta["transformers_runner"] = hf.info
                try:
                    for b in map(int, args.batches.split(",")):
                        rows.append(bench_case(name, dtype, b, args, Transformer(cfg), params,
                                               cfg, n_params, hf))
                        write_results(rows, {**meta, "load_avg_1m": os.getloadavg()[0]}, args)
                finally:
                    if hf:
                        hf.close()
    print(markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
