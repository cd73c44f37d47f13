"""Selection on a corrupted stdlib pool: the fraction of correct pairs each method keeps.

Usage: .venv/bin/python bench/select_pool_bench.py [--steps N] [--out DIR]

The pool of ``tests/test_select.py``: 32 instruction pairs of ten stdlib modules whose
second half has its bodies rotated onto the wrong docstrings. A tiny model is trained
``--steps`` steps on the correct pairs; each method keeps 40% of the pool. ``rds`` scores
against a target set of 16 correct pairs of four other modules
(RDS+: cosine of position-weighted mean final hidden states of the whole example,
instruction and response, the maximum over the target records), once with the trained model
and once with the untrained one (RDS+ embeds with the base model). Writes
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
    bodies = [b for _, b in pairs[half:]]
    lines = [{"instruction": i, "output": b} for i, b in pairs[:half]] + [
        {"instruction": i, "output": b}
        for (i, _), b in zip(pairs[half:], bodies[1:] + bodies[:1])]
    (tmp / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
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
    clean = np.arange(len(lines)) < half
    kept = {}
    for label, method, model in (("nll", "nll", "trained"), ("ifd", "ifd", "trained"),
                                 ("rds (trained model)", "rds", "trained"),
                                 ("rds (untrained model)", "rds", "untrained"),
                                 ("random", "random", "trained")):
        config = load_config(None, common + [f"data.path={tmp / 'pool.jsonl'}",
                                             f"train.init_from={models[model]}"], preset="tiny")
        result = select(config, SelectSpec(method, 0.4),
                        target=target if method == "rds" else None)
        rows = [int(result["records"][i]["source"].rsplit(":", 1)[1]) - 1
                for i in result["selected"]]
        kept[label] = {"kept": len(rows), "clean_fraction": float(np.mean(clean[rows]))}
    result = {**provenance(), "steps": args.steps, "pool": len(lines), "clean": half,
              "target": len(target), "methods": kept}
    (out / "select_pool.json").write_text(json.dumps(result, indent=2))
    md = [f"# Selection on a corrupted stdlib pool ({result['device_kind']}, jax "
          f"{result['jax']}, commit {result['commit']}, {result['date']}, load "
          f"{result['load_avg_1m']:.1f})", "",
          f"{len(lines)} pairs, {half} correct; 40% kept; scorer trained {args.steps} steps "
          f"on the correct pairs; rds target: {len(target)} correct pairs of other modules.", "",
          "| method | kept | correct pairs among them |", "| --- | --- | --- |"]
    md += [f"| {k} | {v['kept']} | {v['clean_fraction']:.2f} |" for k, v in kept.items()]
    (out / "select_pool.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
