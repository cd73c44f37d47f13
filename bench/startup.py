"""Start-up of ``cadenza generate``: wall and CPU time of a warm run on a tiny model.

Each run is a fresh process, ``cadenza generate --checkpoint DIR --prompt TEXT
--max-new-tokens N --json``, as a user types it (the CLI's own platform choice; JAX's
persistent compilation cache on, in a folder of this benchmark). A first round of
every contender warms the compilation cache and Python's bytecode cache; the next
``--repeats`` rounds are measured, contenders interleaved (the order alternates).
The split comes from the command's ``--json`` stats: ``import_s`` (JAX, flax and the
decoder), ``load_s`` (config, params and tokenizer), ``compile_s`` (from the cache),
``prefill_s`` + ``decode_s``; ``rest`` is the wall time outside those (interpreter
start, the CLI's own imports and parsing, output, interpreter exit).

Contenders: the model directory with ``params.safetensors`` (what single-process runs
write) and with orbax ``params/`` (multi-process writes, older directories), both with
Python's bytecode cached as a pip install has it; the safetensors directory with
``PYTHONDONTWRITEBYTECODE=1`` and no bytecode (every module compiled from source at each
start: what an environment installed without bytecode and with that variable set sees);
with ``--peer-python PY``, another cadenza installation (e.g. an older commit's
environment) on the orbax directory, which every version reads; and the floor: a process
that imports JAX and flax and runs one operation (no cadenza; wall and CPU only).
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax

from cadenza.config import load_config
from cadenza.models import init_params, save_model, train_tokenizer
from cadenza.provenance import git_commit, provenance, results_dir

PARTS = ("import_s", "load_s", "compile_s", "generate_s", "rest_s")


FLOOR = "import jax, flax.linen; jax.numpy.zeros(1).block_until_ready()"


def timed(cmd, env: dict) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd``: the finished process, its wall time and CPU time (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def one_run(python, checkpoint, prompt: str, new_tokens: int, env: dict) -> dict:
    """One ``cadenza generate`` process (``checkpoint`` None: the :data:`FLOOR` process):
    wall, CPU (user + system) and the stats split."""
    if checkpoint is None:
        _, wall, cpu = timed([python, "-c", FLOOR], {**env, "JAX_PLATFORMS": "cpu"})
        return {"wall_s": wall, "cpu_s": cpu, "tokens": None}
    proc, wall, cpu = timed([python, "-m", "cadenza", "generate", "--checkpoint",
                             str(checkpoint), "--prompt", prompt, "--max-new-tokens",
                             str(new_tokens), "--json"], env)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    s = out["stats"]
    generate = s["wall_s"]  # compile + prefill + decode, timed by the decoder
    return {"wall_s": wall, "cpu_s": cpu, "import_s": s["import_s"],
            "load_s": s["load_s"], "compile_s": s["compile_s"],
            "generate_s": generate - s["compile_s"],
            "rest_s": wall - s["import_s"] - s["load_s"] - generate,
            "tokens": out["token_ids"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--out", default=None, help="default: bench/results/<device>")
    ap.add_argument("--peer-python", default=None,
                    help="the Python of another cadenza installation to compare with")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    tmp = tempfile.TemporaryDirectory()
    root = pathlib.Path(tmp.name)
    words = "the quick brown fox jumps over the lazy dog and runs home".split()
    tok = train_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20,
                          300, root / "tok")
    cfg = load_config(None, [f"model.vocab_size={tok.vocab_size}"], preset="tiny")
    params = init_params(cfg.model, jax.random.key(0))
    dirs = {"safetensors": save_model(root / "st", cfg, params, tokenizer_dir=root / "tok"),
            "orbax": save_model(root / "ob", cfg, params, tokenizer_dir=root / "tok",
                                params_format="orbax")}
    base = {k: v for k, v in os.environ.items()
            if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "PYTHONDONTWRITEBYTECODE")}
    base.update(CADENZA_COMPILE_CACHE=str(root / "compile-cache"),
                PYTHONPYCACHEPREFIX=str(root / "pycache"))
    me = sys.executable
    contenders = {"safetensors": (me, dirs["safetensors"], base),
                  "orbax": (me, dirs["orbax"], base),
                  "safetensors, no bytecode": (me, dirs["safetensors"],
                                               {**base, "PYTHONDONTWRITEBYTECODE": "1",
                                                "PYTHONPYCACHEPREFIX": str(root / "none")})}
    if args.peer_python:
        peer = subprocess.run([args.peer_python, "-c", "import cadenza, sys; "
                               "sys.stdout.write(cadenza.__file__)"], capture_output=True,
                              text=True, check=True).stdout
        commit = git_commit(pathlib.Path(peer).parent) or "unknown commit"
        contenders[f"peer {commit}, orbax"] = (args.peer_python, dirs["orbax"], base)
    contenders["floor: import JAX + flax, one op"] = (me, None, base)
    prompt = "the quick brown"
    runs = {c: [] for c in contenders}
    tokens = {}
    try:
        for rep in range(args.repeats + 1):                 # round 0 warms the caches
            order = list(contenders) if rep % 2 else list(contenders)[::-1]
            for c in order:
                r = one_run(*contenders[c][:2], prompt, args.max_new_tokens, contenders[c][2])
                found = r.pop("tokens")
                if found is not None:
                    tokens.setdefault(c, found)
                if rep:
                    runs[c].append(r)
            print(f"round {rep}: done", flush=True)
    finally:
        tmp.cleanup()
    rows = []
    for c, rs in runs.items():
        row = {"contender": c}
        for k in ("wall_s", "cpu_s", *PARTS):
            vals = [r[k] for r in rs if k in r]
            row[k] = {"median": statistics.median(vals), "min": min(vals),
                      "max": max(vals)} if vals else None
        rows.append(row)
    same = len({json.dumps(t) for t in tokens.values()}) == 1
    meta = {**provenance(), "load_avg_1m_before": load_before, "config": "tiny",
            "params": cfg.model.num_params(), "dtype": "float32", "prompt": prompt,
            "new_tokens": args.max_new_tokens, "repeats": args.repeats,
            "same_tokens_across_contenders": same}
    out = results_dir(__file__, args.out)
    (out / "startup.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2)
                                      + "\n")
    cell = lambda v: "" if v is None else (  # noqa: E731
        f"{v['median']:.2f} [{v['min']:.2f}-{v['max']:.2f}]")
    lines = ["# Start-up: a warm `cadenza generate` on a tiny model", "",
             f"tiny model ({meta['params'] / 1e6:.2f}M params, float32), one prompt, "
             f"{args.max_new_tokens} new tokens, greedy; a fresh process per run with the "
             f"persistent compilation cache warm. jax {meta['jax']}, commit "
             f"{meta['commit']}, {meta['date']}, {meta['device_kind']}, "
             f"{meta['cpu_count']} CPU cores, load average {load_before:.1f} before and "
             f"{meta['load_avg_1m']:.1f} after (a shared machine, other jobs running: wall "
             f"times are inflated; CPU time, user + system of the process, is the closer "
             f"estimate of an idle machine's wall time). Medians of {args.repeats} runs "
             f"[min-max] in seconds, contenders interleaved. Same tokens from every "
             f"contender: {'yes' if same else 'NO'}.", "",
             "| contender | wall | CPU | import | load | compile (cache) | prefill + decode "
             "| rest (start, CLI, exit) |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['contender']} | " + " | ".join(
            cell(r[k]) for k in ("wall_s", "cpu_s", *PARTS)) + " |")
    (out / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
