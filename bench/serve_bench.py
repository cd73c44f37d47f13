"""Serving under load: Poisson arrivals against ``cadenza serve`` vs static batching.

    .venv/bin/python bench/serve_bench.py [--config tiny] [--requests 16] [--rates 2,8,32]
        [--slots 4] [--repeats 5] [--methods plain,ngram] [--adapters 4]

A random-weight float32 model is saved to a temporary directory and served by one
``cadenza serve`` subprocess per method (``plain``: one token per step; ``ngram``: prompt
lookup rounds), plus one serving ``--adapters`` random rank-8 LoRA adapters (plain
decoding; the requests spread round-robin over the base and the adapters, so one batch
mixes them), on loopback. The same ``--requests`` requests (prompt 4-28 tokens, 8-48
new tokens, greedy, EOS ignored; fixed by ``--seed``) arrive as a Poisson process at each
rate (requests/s) and stream their tokens over server-sent events. The peer, measured in
the same run on the same arrival times: static batching through
``cadenza.decode.generate`` in this process, ``--slots`` requests per batch in arrival
order, a batch starting once its last request has arrived and the previous batch has
finished, decoding to its longest request's length; its first token counts at the end
of its prefill, its later tokens spread evenly over its decode time.

Per method and rate, medians over ``--repeats`` rounds (contenders interleaved, the order
alternating) with [min-max]: throughput (generated tokens / (last token - first
arrival)), time to first token p50/p90 and inter-token latency p50/p90 (per request, gaps
between streamed chunks divided by the chunk's tokens). Every served greedy output is
checked against the static batch's. A first round warms up (compiles) and is not counted.
Writes ``bench/results/<device>/serve_bench.{json,md}``.
"""

import argparse
import http.client
import json
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import jax
import numpy as np

from cadenza.config import load_config
from cadenza.decode import DecodeConfig, generate
from cadenza.models import Transformer, init_params, save_model
from cadenza.provenance import provenance, results_dir

CONFIGS = {
    "tiny": [],
    "10m": ["model.vocab_size=8192", "model.hidden_size=320", "model.num_layers=6",
            "model.num_heads=5", "model.num_kv_heads=5", "model.intermediate_size=864"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_adapters_for(cfg, params, directory, count: int) -> list[str]:
    """``count`` rank-8 LoRA adapters on every projection, random non-zero factors, saved
    under ``directory``; returns ``NAME=DIR`` specs."""
    import dataclasses

    from cadenza.train import peft
    from cadenza.train.peft.artifacts import save_adapters

    c = dataclasses.replace(cfg, peft=dataclasses.replace(cfg.peft, method="lora", rank=8,
                                                          targets=".*_proj"))
    specs = []
    for i in range(count):
        _, trainable, _ = peft.prepare(c, params, jax.random.key(100 + i))
        leaves, tree = jax.tree.flatten(trainable)
        keys = jax.random.split(jax.random.key(200 + i), len(leaves))
        trainable = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                              for x, k in zip(leaves, keys)])
        specs.append(f"lora{i}={save_adapters(pathlib.Path(directory) / f'lora{i}', c, trainable)}")
    return specs


def start_server(checkpoint, method: str, slots: int, max_len: int, adapters=()):
    """A ``cadenza serve`` subprocess; returns ``(process, base url)`` once /health is ok."""
    port = free_port()
    cmd = [sys.executable, "-m", "cadenza", "serve", "--checkpoint", str(checkpoint),
           "--method", method, "--slots", str(slots), "--max-len", str(max_len),
           "--port", str(port), "--gamma", "4"]
    for spec in adapters:
        cmd += ["--adapter", spec]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"cadenza serve exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("cadenza serve did not become healthy")


def one_request(url: str, prompt, n: int, t0: float, record: dict, model=None) -> None:
    """Stream one completion (``model``: an adapter name, or None for the base); record
    arrival, chunk times and tokens."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    record["sent"] = time.perf_counter() - t0
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
         "stream": True, **({"model": model} if model else {})}),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    times, tokens = [], []
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        ids = json.loads(line[6:])["choices"][0]["token_ids"]
        if ids:
            times.append((time.perf_counter() - t0, len(ids)))
            tokens += ids
    conn.close()
    record.update(chunks=times, tokens=tokens)


def serve_round(url, prompts, limits, arrivals, models=None) -> list[dict]:
    """Send every request at its arrival time (seconds from now; ``models[i]``: request i's
    adapter or None); wait for all."""
    records = [{} for _ in prompts]
    threads = []
    t0 = time.perf_counter()
    for i, (p, n, at) in enumerate(zip(prompts, limits, arrivals)):
        time.sleep(max(0.0, at - (time.perf_counter() - t0)))
        th = threading.Thread(target=one_request, args=(url, p, n, t0, records[i],
                                                        models[i] if models else None))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    for r, at in zip(records, arrivals):
        r["arrival"] = at
    return records


def static_round(model, params, prompts, limits, arrivals, slots) -> list[dict]:
    """Static batching through generate on the same arrival times (see the docstring)."""
    records = [None] * len(prompts)
    t0 = time.perf_counter()
    for start in range(0, len(prompts), slots):
        idx = list(range(start, min(start + slots, len(prompts))))
        time.sleep(max(0.0, arrivals[idx[-1]] - (time.perf_counter() - t0)))
        began = time.perf_counter() - t0
        n = max(limits[i] for i in idx)
        res = generate(model, params, [prompts[i] for i in idx],
                       DecodeConfig(max_new_tokens=n, ignore_eos=True))
        end = time.perf_counter() - t0
        first = began + res.stats["compile_s"] + res.stats["prefill_s"]
        per = (end - first) / max(n - 1, 1)
        for row, i in enumerate(idx):
            k = limits[i]
            records[i] = {"arrival": arrivals[i], "tokens": res.token_ids[row][:k],
                          "chunks": [(first, 1)] + [(first + per * j, 1) for j in range(1, k)]}
    return records


def summarise(records) -> dict:
    """Throughput, TTFT and inter-token latency of one round."""
    first = min(r["arrival"] for r in records)
    last = max(r["chunks"][-1][0] for r in records)
    tokens = sum(len(r["tokens"]) for r in records)
    ttft = [r["chunks"][0][0] - r["arrival"] for r in records]
    itl = []
    for r in records:
        for (a, _), (b, k) in zip(r["chunks"], r["chunks"][1:]):
            itl += [(b - a) / k] * k
    q = lambda xs, p: float(np.percentile(xs, p)) if xs else float("nan")  # noqa: E731
    return {"tokens_per_s": tokens / (last - first), "ttft_p50": q(ttft, 50),
            "ttft_p90": q(ttft, 90), "itl_p50": q(itl, 50), "itl_p90": q(itl, 90)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--rates", default="2,8,32", help="arrivals per second, comma-separated")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default="plain,ngram")
    ap.add_argument("--adapters", type=int, default=4,
                    help="also serve this many LoRA adapters (plain decoding), requests "
                         "spread over them and the base (0: off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = ap.parse_args(argv)
    cfg = load_config(None, CONFIGS[args.config], preset="tiny")
    params = init_params(cfg.model, jax.random.key(args.seed))
    model = Transformer(cfg.model)
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(3, cfg.model.vocab_size, int(rng.integers(4, 29))).tolist()
               for _ in range(args.requests)]
    limits = [int(x) for x in rng.integers(8, 49, args.requests)]
    rates = [float(r) for r in args.rates.split(",")]
    methods = args.methods.split(",")
    tmp = tempfile.TemporaryDirectory()
    ckpt = save_model(pathlib.Path(tmp.name) / "model", cfg, params)
    servers = {m: start_server(ckpt, m, args.slots, 80) for m in methods}
    lora = f"plain+{args.adapters} adapters"
    models = None
    if args.adapters:
        specs = save_adapters_for(cfg, params, tmp.name, args.adapters)
        servers[lora] = start_server(ckpt, "plain", args.slots, 80, specs)
        names = [None] + [s.split("=")[0] for s in specs]
        models = [names[i % len(names)] for i in range(args.requests)]
    contenders = [*servers, "static"]
    try:
        results = {(c, r): [] for c in contenders for r in rates}
        mismatches = 0
        for rep in range(args.repeats + 1):            # round 0 warms up
            for rate in rates:
                arrivals = np.cumsum(rng.exponential(1.0 / rate, args.requests)).tolist()
                arrivals = [a - arrivals[0] for a in arrivals]
                order = contenders if rep % 2 == 0 else contenders[::-1]
                outs = {}
                for c in order:
                    if c == "static":
                        recs = static_round(model, params, prompts, limits, arrivals,
                                            args.slots)
                    else:
                        recs = serve_round(servers[c][1], prompts, limits, arrivals,
                                           models if c == lora else None)
                    outs[c] = [r["tokens"] for r in recs]
                    if rep:
                        results[(c, rate)].append(summarise(recs))
                mismatches += sum(outs[m] != outs["static"] for m in methods)
                print(f"round {rep} rate {rate}: done", flush=True)
        accept = {}
        for m in servers:
            with urllib.request.urlopen(servers[m][1] + "/metrics") as r:
                accept[m] = json.load(r)["tokens_per_slot_step"]
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
        tmp.cleanup()
    rows = []
    for (c, rate), runs in results.items():
        row = {"contender": c, "rate": rate}
        for k in runs[0]:
            vals = [r[k] for r in runs]
            row[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        row["tokens_per_slot_step"] = accept.get(c)
        rows.append(row)
    meta = {**provenance(), "config": args.config, "params": cfg.model.num_params(),
            "dtype": "float32", "requests": args.requests, "slots": args.slots,
            "repeats": args.repeats, "prompt_len": "4-28", "new_tokens": "8-48",
            "outputs_differing_from_static": mismatches}
    out = results_dir(__file__, args.out)
    (out / "serve_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2)
                                          + "\n")
    lines = ["# Serving: continuous batching (cadenza serve) vs static batching (generate)", "",
             f"{args.config} model ({meta['params'] / 1e6:.1f}M params, random float32 "
             f"weights), {args.requests} greedy requests (prompts 4-28, 8-48 new tokens), "
             f"{args.slots} slots / batch size, Poisson arrivals; jax {meta['jax']}, commit "
             f"{meta['commit']}, {meta['date']}, {meta['device_kind']}, {meta['cpu_count']} "
             f"CPU cores, load average {meta['load_avg_1m']:.1f} at the end (a shared, loaded "
             f"machine: absolute numbers are noisy). Medians of {args.repeats} rounds "
             f"[min-max], contenders interleaved. Served outputs differing from static "
             f"batching's: {mismatches}.", "",
             "| contender | rate (req/s) | tokens/s | TTFT p50 s | TTFT p90 s | ITL p50 ms | "
             "ITL p90 ms | tokens per slot-step |", "|" + "---|" * 8]
    for r in rows:
        f = lambda k, s=1.0: (f"{r[k]['median'] * s:.3g} [{r[k]['min'] * s:.3g}-"  # noqa: E731
                              f"{r[k]['max'] * s:.3g}]")
        acc = "" if r["tokens_per_slot_step"] is None else f"{r['tokens_per_slot_step']:.2f}"
        lines.append(f"| {r['contender']} | {r['rate']:g} | {f('tokens_per_s')} | "
                     f"{f('ttft_p50')} | {f('ttft_p90')} | {f('itl_p50', 1e3)} | "
                     f"{f('itl_p90', 1e3)} | {acc} |")
    (out / "serve_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
