"""Selection on a corrupted stdlib pool: the fraction of correct pairs each method keeps.

Usage: .venv/bin/python bench/select_pool_bench.py [--steps N] [--out DIR]

The pool of ``tests/test_select.py``: 32 instruction pairs of ten stdlib modules whose
second half has its bodies rotated onto the wrong docstrings. A tiny model is trained
``--steps`` steps on the correct pairs; each method keeps 40% of the pool. ``rds`` scores
against a target set of 16 correct pairs of four other modules
(RDS+: cosine of position-weighted mean final hidden states of the whole example,
instruction and response, the maximum over the target records), once with the trained model
and once with the untrained one (RDS+ embeds with the base model).

The same pairs are also corrupted in two other places, to tell a method that finds the
correct pairs from one that prefers some modules (the two halves hold different modules):
the first half instead of the second, and every other pair. And a paired test with no
module difference at all: every instruction twice, with its own body and with the next
pair's body; the fraction of instructions whose own body scores better. Writes
bench/results/<device>/select_pool.{json,md}; deterministic, no timings.
"""

import argparse
import json
import pathlib
import tempfile

import jax
import numpy as np

from cadenza.config import load_config
from cadenza.models import init_params, save_model
from cadenza.models.checkpoint import tokenizer_dir
from cadenza.provenance import provenance, results_dir
from cadenza.train import fit
from cadenza.train.data import stdlib
from cadenza.train.select import SelectSpec, select

MODULES = ["textwrap.py", "bisect.py", "colorsys.py", "shlex.py", "fnmatch.py", "glob.py",
           "copy.py", "heapq.py", "calendar.py", "string.py"]
TARGET = ["difflib.py", "inspect.py", "argparse.py", "tarfile.py"]   # correct pairs elsewhere
SEQ_LEN = 128
LABELS = (("nll", "nll", "trained"), ("ifd", "ifd", "trained"),
          ("rds (trained model)", "rds", "trained"), ("rds (untrained model)", "rds", "untrained"),
          ("random", "random", "trained"))


def chat(instruction, body):
    return {"messages": [{"role": "user", "content": instruction},
                         {"role": "assistant", "content": body}], "text": "", "source": "t"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps of the scorer")
    parser.add_argument("--out", default=None, help="results folder")
    args = parser.parse_args()
    out = results_dir(__file__, args.out)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="select_pool_"))
    root = stdlib.stdlib_root()
    def short(modules):
        return [p[:2] for m in modules for p in
                stdlib.instruction_pairs((root / m).read_text(), m) if len(p[0]) + len(p[1]) < 320]
    pairs, target = short(MODULES)[:32], [chat(i, b) for i, b in short(TARGET)[:16]]
    half = len(pairs) // 2
    (tmp / "clean.jsonl").write_text("".join(
        json.dumps({"instruction": i, "output": b}) + "\n" for i, b in pairs))
    common = [f"data.data_dir={tmp / 'data'}", "data.format=alpaca",
              "data.heldout_fraction=0.0", f"train.seq_len={SEQ_LEN}"]
    config = load_config(None, common + [
        f"data.path={tmp / 'clean.jsonl'}", f"train.output_dir={tmp / 'trained'}",
        f"train.steps={args.steps}", "train.learning_rate=1e-2", "train.warmup_steps=5",
        "train.tensorboard=false", "train.progress_bar=false", "train.log_every=1000"],
        preset="tiny")
    models = {"trained": fit(config)["model_dir"], "untrained": str(tmp / "untrained")}
    save_model(models["untrained"], config, init_params(config.model, jax.random.key(0)),
               tokenizer_dir=tokenizer_dir(models["trained"]))

    def scores(lines, name, method, model, budget):   # a file per pool: builds are cached
        path = tmp / f"{name}.jsonl"
        if not path.exists():
            path.write_text("".join(json.dumps(r) + "\n" for r in lines))
        config = load_config(None, common + [f"data.path={path}",
                                             f"train.init_from={models[model]}"], preset="tiny")
        result = select(config, SelectSpec(method, budget),
                        target=target if method == "rds" else None)
        line = [int(r["source"].rsplit(":", 1)[1]) - 1 for r in result["records"]]
        score = np.full(len(lines), np.nan)
        score[line] = result["scores"]
        return score, [line[i] for i in result["selected"]]

    kept = {}
    for pool, corrupt in (("second half", range(half, len(pairs))), ("first half", range(half)),
                          ("every other", range(1, len(pairs), 2))):
        bodies = [pairs[k][1] for k in corrupt]
        wrong = dict(zip(corrupt, bodies[1:] + bodies[:1]))   # rotated among themselves
        lines = [{"instruction": i, "output": wrong.get(k, b)} for k, (i, b) in enumerate(pairs)]
        clean = ~np.isin(np.arange(len(lines)), list(corrupt))
        for label, method, model in LABELS:
            _, rows = scores(lines, f"pool {pool}", method, model, 0.4)
            kept.setdefault(label, {})[pool] = {"kept": len(rows),
                                                "clean_fraction": float(np.mean(clean[rows]))}
    lines = [{"instruction": i, "output": b} for k, (i, b) in enumerate(pairs)
             for b in (b, pairs[(k + 1) % len(pairs)][1])]
    paired = {}
    for label, method, model in LABELS[:-1]:
        score, _ = scores(lines, "paired", method, model, 1.0)
        own, other = score[0::2], score[1::2]
        ok = np.isfinite(own) & np.isfinite(other)
        better = own > other if method == "rds" else own < other
        paired[label] = {"instructions": int(ok.sum()), "own_better": float(np.mean(better[ok]))}
    result = {**provenance(), "steps": args.steps, "pool": len(pairs), "clean": half,
              "target": len(target), "methods": kept, "paired": paired}
    (out / "select_pool.json").write_text(json.dumps(result, indent=2))
    pools = list(kept["nll"])
    md = [f"# Selection on a corrupted stdlib pool ({result['device_kind']}, jax "
          f"{result['jax']}, commit {result['commit']}, {result['date']}, load "
          f"{result['load_avg_1m']:.1f})", "",
          f"{len(pairs)} pairs, {half} of them with a wrong body; 40% kept; scorer trained "
          f"{args.steps} steps on the correct pairs; rds target: {len(target)} correct pairs of "
          "other modules. Correct pairs among the kept, by which pairs were corrupted (the "
          "test's pool: the second half):", "",
          "| method | kept | " + " | ".join(f"{p} corrupted" for p in pools) + " |",
          "| --- | --- | " + " | ".join("---" for _ in pools) + " |"]
    md += [f"| {k} | {v[pools[0]]['kept']} | "
           + " | ".join(f"{v[p]['clean_fraction']:.2f}" for p in pools) + " |"
           for k, v in kept.items()]
    n = next(iter(paired.values()))["instructions"]
    md += ["", f"Paired: {n} instructions, each with its own body and the next pair's; the "
           "fraction whose own body scores better (0.50: no signal).", "",
           "| method | own body better |", "| --- | --- |"]
    md += [f"| {k} | {v['own_better']:.2f} |" for k, v in paired.items()]
    (out / "select_pool.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
