"""Merging and data selection on the tiny stdlib instruction task (held-out losses).

Usage: .venv/bin/python bench/merge_select_bench.py [--steps N] [--quick] [--out DIR]

(a) Merging: a base (tiny preset, full SFT on the instruction pairs of a few general
modules) is fine-tuned on two disjoint module sets A and B (the specialists); every merge
method combines the two. Held-out loss on A and B of the base, each specialist and each
merge (a merge should beat the other specialist on each set), and DARE at p in {0.5, 0.9,
0.99}.
(b) Selection: the base fine-tuned at equal steps on 30% of the pool (A and B's training
pairs) chosen by each selection method vs a random 30%; held-out loss on A + B.

Losses are the token-weighted mean NLL over held-out pairs (10% of each set's pairs,
chosen by a hash of the instruction). Every model is also scored on the quickstart's
task over those held-out pairs (:mod:`cadenza.quickstart_eval`: complete the docstring
with a body; first-line exact match of the greedy body, syntax pass@1 of sampled bodies;
bodies of at most 120 tokens). Writes bench/results/<device>/merge_select.{json,md}
(``--quick``: a few steps, into ``<device>-quick``); deterministic, no timings.
"""

import argparse
import hashlib
import json
import pathlib
import tempfile

import numpy as np

from cadenza.config import load_config
from cadenza.models import Transformer, load_model, load_tokenizer
from cadenza.models.checkpoint import tokenizer_dir
from cadenza.provenance import device_label, provenance, results_dir
from cadenza.quickstart_eval import measure_task, task_example
from cadenza.train import fit
from cadenza.train.data import stdlib
from cadenza.train.merge import MergeSpec, merge_models
from cadenza.train.select import SelectSpec, select, write_selection

GENERAL = ["textwrap.py", "string.py", "copy.py", "glob.py"]
SET_A = ["shlex.py", "fnmatch.py", "bisect.py", "heapq.py", "colorsys.py", "calendar.py"]
SET_B = ["json/", "csv.py", "base64.py", "quopri.py", "uu.py", "gzip.py"]
SEQ_LEN = 256
NEW_TOKENS, SAMPLES, MAX_BODY_TOKENS = 128, 5, 120   # the quickstart's task settings
MERGES = {"linear": MergeSpec("linear"), "task_arithmetic": MergeSpec("task_arithmetic"),
          "ties": MergeSpec("ties"), "dare_linear": MergeSpec("dare_linear"),
          "dare_ties": MergeSpec("dare_ties"), "breadcrumbs": MergeSpec("breadcrumbs"),
          "model_stock": MergeSpec("model_stock"),
          "dare_linear p=0.5": MergeSpec("dare_linear", drop_rate=0.5),
          "dare_linear p=0.99": MergeSpec("dare_linear", drop_rate=0.99)}


def pairs_of(modules):
    """(train, heldout) alpaca records of the modules' instruction pairs."""
    root, train, held = stdlib.stdlib_root(), [], []
    for rel in stdlib.stdlib_files(modules):
        try:
            found = stdlib.instruction_pairs((root / rel).read_text(encoding="utf-8"), rel)
        except (SyntaxError, UnicodeDecodeError):
            continue
        for instruction, body, _ in found:
            record = {"instruction": instruction, "output": body}
            bucket = hashlib.sha256(instruction.encode()).digest()[0] < 26  # ~10%
            (held if bucket else train).append(record)
    return train, held


def write(path: pathlib.Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def common(tmp: pathlib.Path):
    return [f"data.data_dir={tmp / 'data'}", "data.format=alpaca", "data.heldout_fraction=0.0",
            "data.stdlib_modules=[" + ",".join(GENERAL + SET_A + SET_B) + "]",
            f"train.seq_len={SEQ_LEN}", "train.tensorboard=false", "train.progress_bar=false",
            "train.log_every=1000", "train.learning_rate=3e-3", "train.warmup_steps=10"]


def train(tmp, name, data_path, steps, init_from=None, fmt="alpaca") -> str:
    extra = [f"train.init_from={init_from}"] if init_from else []
    extra.append(f"data.format={fmt}")
    summary = fit(load_config(None, common(tmp) + extra + [
        f"data.path={data_path}", f"train.output_dir={tmp / name}", f"train.steps={steps}"],
        preset="tiny"))
    return summary["model_dir"]


def heldout_loss(tmp, model_dir, data_path) -> float:
    """Token-weighted mean NLL of ``model_dir`` on the records of ``data_path``."""
    config = load_config(None, common(tmp) + [f"data.path={data_path}",
                                              f"train.init_from={model_dir}"], preset="tiny")
    details = select(config, SelectSpec("nll", 1.0))["details"]
    ok = np.isfinite(details["nll"])
    return float((details["nll"][ok] * details["response_tokens"][ok]).sum()
                 / details["response_tokens"][ok].sum())


def task_examples(model_dir, records) -> list[dict]:
    """The quickstart task's examples of ``records`` (alpaca), tokenized as ``model_dir``."""
    tok = load_tokenizer(tokenizer_dir(model_dir))
    found = [task_example(tok, r["instruction"], r["output"], f"held:{k}", SEQ_LEN,
                          MAX_BODY_TOKENS) for k, r in enumerate(records)]
    return [e for e in found if e is not None]


def task_score(model_dir, examples) -> dict:
    """First-line exact match and syntax pass@1 of ``model_dir`` on ``examples``."""
    config, params = load_model(model_dir)
    scores, _ = measure_task(Transformer(config.model), params, examples,
                             load_tokenizer(tokenizer_dir(model_dir)), NEW_TOKENS, SAMPLES)
    return {k: scores[k] for k in ("first_line_exact", "pass@1")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps of every training run")
    parser.add_argument("--quick", action="store_true", help="a few steps (a smoke run)")
    parser.add_argument("--out", default=None, help="results folder")
    args = parser.parse_args()
    steps = 3 if args.quick else args.steps
    out = results_dir(__file__, args.out or (pathlib.Path(__file__).resolve().parent / "results"
                                             / f"{device_label()}-quick" if args.quick
                                             else None))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="merge_select_"))
    general, _ = pairs_of(GENERAL)
    (a_train, a_held), (b_train, b_held) = pairs_of(SET_A), pairs_of(SET_B)
    files = {k: write(tmp / f"{k}.jsonl", v) for k, v in
             {"general": general, "a": a_train, "b": b_train, "a_held": a_held,
              "b_held": b_held, "pool": a_train + b_train, "held": a_held + b_held}.items()}
    base = train(tmp, "base", files["general"], steps)
    spec_a = train(tmp, "spec_a", files["a"], steps, base)
    spec_b = train(tmp, "spec_b", files["b"], steps, base)
    rows = {"base": base, "specialist A": spec_a, "specialist B": spec_b}
    for name, spec in MERGES.items():
        rows[f"merge {name}"] = str(tmp / f"merge_{name.replace(' ', '_').replace('=', '')}")
        merge_models(base, [spec_a, spec_b], rows[f"merge {name}"], spec)
    tasks = {k: task_examples(base, v) for k, v in
             {"A": a_held, "B": b_held, "A + B": a_held + b_held}.items()}
    merging = {name: {"A": heldout_loss(tmp, d, files["a_held"]),
                      "B": heldout_loss(tmp, d, files["b_held"]),
                      "task A": task_score(d, tasks["A"]), "task B": task_score(d, tasks["B"])}
               for name, d in rows.items()}
    selection = {}
    for method in ("random", "length", "nll", "ifd", "grape", "rds"):
        config = load_config(None, common(tmp) + [f"data.path={files['pool']}",
                                                  f"train.init_from={base}"], preset="tiny")
        target = None
        if method == "rds":  # the held-out sets' instructions stand for the target task
            target = [{"messages": [{"role": "user", "content": r["instruction"]},
                                    {"role": "assistant", "content": r["output"]}],
                       "text": "", "source": "held"} for r in (a_held + b_held)[:32]]
        spec = SelectSpec(method, 0.3, seed=0)
        chosen = write_selection(tmp / f"sel_{method}", select(config, spec, target=target),
                                 spec, {})
        model = train(tmp, f"sft_{method}", chosen / "records.jsonl", steps, base, "messages")
        selection[method] = {"loss": heldout_loss(tmp, model, files["held"]),
                             "task": task_score(model, tasks["A + B"])}
    result = {**provenance(), "steps": steps, "quick": args.quick, "seq_len": SEQ_LEN,
              "sets": {"general": GENERAL, "A": SET_A, "B": SET_B},
              "pairs": {"general": len(general), "A": [len(a_train), len(a_held)],
                        "B": [len(b_train), len(b_held)]},
              "task": {"examples": {k: len(v) for k, v in tasks.items()},
                       "new_tokens": NEW_TOKENS, "samples": SAMPLES,
                       "max_body_tokens": MAX_BODY_TOKENS},
              "merging": merging, "selection_30pct": selection}
    (out / "merge_select.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Merging and selection, tiny stdlib task ({result['device_kind']}, jax "
             f"{result['jax']}, commit {result['commit']}, {result['date']}, load "
             f"{result['load_avg_1m']:.1f}, {steps} steps per run)", "",
             f"Task: {len(tasks['A'])} held-out functions of A, {len(tasks['B'])} of B; "
             "first-line exact match (greedy) / syntax pass@1 "
             f"({SAMPLES} samples at temperature 0.8).", "",
             "| model | held-out loss A | held-out loss B | task A | task B |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['A']:.4f} | {v['B']:.4f} | {_task(v['task A'])} | "
              f"{_task(v['task B'])} |" for k, v in merging.items()]
    lines += ["", "| SFT on 30% chosen by | held-out loss (A + B) | task (A + B) |",
              "| --- | --- | --- |"]
    lines += [f"| {k} | {v['loss']:.4f} | {_task(v['task'])} |" for k, v in selection.items()]
    (out / "merge_select.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _task(scores: dict) -> str:
    return f"{scores['first_line_exact']:.2f} / {scores['pass@1']:.2f}"


if __name__ == "__main__":
    main()
