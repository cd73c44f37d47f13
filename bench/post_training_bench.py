"""Post-training on the tiny stdlib instruction task: LISA vs LoRA vs full, Masked Thought.

Usage: .venv/bin/python bench/post_training_bench.py [--steps N] [--quick] [--out DIR]

1. SFT: the tiny preset, full SFT on the instruction pairs of the general modules and set A
   (the modules of ``merge_select_bench``).
2. Selective fine-tuning: from the SFT model, LISA (1 of 2 layers, period 10), LoRA (rank 8,
   every projection) and full fine-tuning on set B at equal steps: held-out loss on B and
   the peak resident memory of the training process (CPU: host memory, so the JAX runtime
   dominates a model this small; the JSON keeps LISA's printed optimizer-state share).
3. Masked Thought: full fine-tuning on set B with ``data.response_mask_prob`` p in
   {0, 0.1, 0.2} (p = 0 is the full run of 2): held-out loss on B.

DPO and ORPO are measured by ``preference_bench.py`` (held-out modules, an SFT baseline).

Every training run is its own process (its peak memory is its own). Held-out losses are
token-weighted mean response NLLs (as in ``merge_select_bench``). Writes
bench/results/<device>/post_training.{json,md} (``--quick``: into ``<device>-quick``);
deterministic losses, no timings.
"""

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile

from merge_select_bench import GENERAL, SET_A, SET_B, heldout_loss, pairs_of, write

from cadenza.config import load_config
from cadenza.provenance import device_label, provenance, results_dir
from cadenza.train.merge import MergeSpec, merge_models

SEQ_LEN = 256
COMMON = ["train.tensorboard=false", "train.progress_bar=false", "train.log_every=1000",
          "train.async_checkpoints=false", f"train.seq_len={SEQ_LEN}", "data.heldout_fraction=0.0",
          "train.warmup_steps=10"]


def run_one(overrides: list[str]) -> None:
    """Child process: ``fit`` the tiny preset with ``overrides``; print one JSON line with
    the summary and this process's peak resident memory."""
    from cadenza.train import fit

    summary = fit(load_config(None, overrides, preset="tiny"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print("RESULT " + json.dumps({"model_dir": summary["model_dir"],
                                  "adapters_dir": summary.get("adapters_dir"),
                                  "loss": summary["loss"],
                                  "eval_loss": summary["eval_loss"], "peak_rss": peak}))


def train(tmp: pathlib.Path, name: str, overrides: list[str]) -> dict:
    """One training run in its own process; its summary, peak memory and last metrics."""
    out = tmp / name
    argv = [sys.executable, __file__, "--one", json.dumps(
        COMMON + [f"data.data_dir={tmp / 'data'}", f"train.output_dir={out}", *overrides])]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"run {name} failed:\n{proc.stderr[-4000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    result["last"] = {k: v for m in metrics for k, v in m.items()}
    result["log"] = [x for x in proc.stdout.splitlines() if x.startswith("peft ")]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps of every training run")
    parser.add_argument("--quick", action="store_true", help="a few steps (a smoke run)")
    parser.add_argument("--out", default=None, help="results folder")
    parser.add_argument("--one", help=argparse.SUPPRESS)   # internal: one run, JSON overrides
    args = parser.parse_args()
    if args.one:
        return run_one(json.loads(args.one))
    steps = 3 if args.quick else args.steps
    out = results_dir(__file__, args.out or (pathlib.Path(__file__).resolve().parent / "results"
                                             / f"{device_label()}-quick" if args.quick
                                             else None))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="post_training_"))
    general, _ = pairs_of(GENERAL)
    (a_train, _), (b_train, b_held) = pairs_of(SET_A), pairs_of(SET_B)
    files = {k: write(tmp / f"{k}.jsonl", v) for k, v in
             {"sft": general + a_train, "b": b_train, "b_held": b_held}.items()}
    base = ["data.format=alpaca", "train.learning_rate=3e-3"]
    sft = train(tmp, "sft", base + [f"data.path={files['sft']}", f"train.steps={steps}"])
    fine = {}
    methods = {"full": [], "lora": ["peft.method=lora", "peft.rank=8", "peft.targets=.*_proj"],
               "lisa": ["peft.method=lisa", "peft.lisa_layers=1", "peft.period=10"],
               "masked p=0.1": ["data.response_mask_prob=0.1"],
               "masked p=0.2": ["data.response_mask_prob=0.2"]}
    for name, extra in methods.items():
        r = train(tmp, name.replace(" ", "_").replace("=", ""), base + [
            f"data.path={files['b']}", f"train.init_from={sft['model_dir']}",
            f"train.steps={steps}", *extra])
        model = r["model_dir"]
        if model is None:   # adapters alone: fold them into the SFT model to score it
            model = str(tmp / f"{name}_merged")
            merge_models(sft["model_dir"], [r["adapters_dir"]], model, MergeSpec("linear"))
        fine[name] = {"heldout_loss_b": heldout_loss(tmp, model, files["b_held"]),
                      "peak_rss_mib": r["peak_rss"] / (1 << 20), "log": r["log"]}
    fine["sft model (no fine-tuning)"] = {
        "heldout_loss_b": heldout_loss(tmp, sft["model_dir"], files["b_held"])}
    result = {**provenance(), "steps": steps, "quick": args.quick, "seq_len": SEQ_LEN,
              "pairs": {"sft": len(general) + len(a_train), "B": [len(b_train), len(b_held)]},
              "fine_tuning": fine}
    (out / "post_training.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Post-training, tiny stdlib task ({result['device_kind']}, jax {result['jax']}, "
             f"commit {result['commit']}, {result['date']}, load {result['load_avg_1m']:.1f}, "
             f"{steps} steps per run)", "",
             f"Fine-tuning the SFT model on set B ({len(b_train)} pairs, {len(b_held)} "
             "held out), equal steps (p=0 of Masked Thought is `full`):", "",
             "| run | held-out loss B | peak RSS of the run (MiB) |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['heldout_loss_b']:.4f} | "
              f"{_f(v.get('peak_rss_mib'), '.0f')} |" for k, v in fine.items()]
    (out / "post_training.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _f(x, fmt=".3f"):
    return "—" if x is None else format(x, fmt)


if __name__ == "__main__":
    main()
