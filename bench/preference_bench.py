"""DPO and ORPO on stdlib preference pairs: held-out pair accuracy against the SFT model.

Usage: .venv/bin/python bench/preference_bench.py [--width W] [--layers L] [--sft-steps N]
[--steps N] [--lr-full LR] [--lr-lora LR] [--rejected K] [--beta B] [--orpo-lambda L]
[--quick] [--methods full,lora] [--tasks dpo,orpo] [--out DIR]

The modules of the stdlib split by a stable hash of their path (``stdlib.is_heldout``,
fraction ``HELDOUT_MODULES``): no held-out pair shares a module, a prompt or a body with
any training pair, and the byte-level BPE tokenizer is trained on the training modules only.

1. SFT: the tiny preset at hidden size ``--width`` and ``--layers`` layers (MLP 3x the
   width, 4 heads of which 2 key/value heads; 64 x 2 is the preset itself), full SFT on
   every instruction pair of the training modules (signature + docstring -> body,
   ``--sft-steps``, peak learning rate ``--sft-lr``), kept in ``<runs>/sft-<shape>-...``
   (``--runs``, default ``runs/preference_bench``), like every DPO/ORPO run below (its
   folder named by its settings): a rerun reuses finished runs. The input files are
   written to ``<runs>/inputs``, named by a hash of their content, and prepared under
   ``<runs>/data`` (tokenizer included), so a rerun on the same inputs rebuilds nothing.
2. Pairs: chosen = the function's true body, rejected = the body of the next function in a
   seeded shuffle of the same split (training pairs from training modules, held-out pairs
   from held-out modules); only short functions (prompt + body, and prompt + rejected
   body, under ``MAX_CHARS`` characters), so no side is cut.
3. DPO (beta ``--beta``, sigmoid loss) and ORPO (lambda ``--orpo-lambda``) from the SFT
   model (``--rejected`` K: each training prompt paired with K other bodies;
   ``--rejected-by length``: those next to its body in length, a harder set), full
   fine-tuning and LoRA (rank 8 on every projection; ``--methods``), ``--steps`` each of 8 rows
   (about 11 pairs), peak learning rate ``--lr-full`` / ``--lr-lora`` after ``WARMUP``
   steps, cosine to 0.1x. Under one epoch every step's batch is mostly unseen pairs, so its
   loss is a
   held-out loss: at a constant 1e-3 (full) DPO fits 32 repeated pairs to reward accuracy
   1.0 within 60 steps of 4 rows, but on the full set its batch loss climbs above log 2
   as both sides' log-probs fall, so full fine-tuning uses 2e-4 (LoRA 1e-3).
4. Every model (the SFT model first: the baseline) scores every held-out pair by the summed
   and the length-averaged log-prob of each side given the prompt (one forward per side,
   the ``nll`` scorer of ``cadenza select``). Pair accuracy: the chosen side scores higher
   (ties count 1/2). Columns: length-averaged log-prob (ORPO's reward), summed log-prob,
   DPO's implicit reward ``log pi - log pi_sft`` (what DPO's ``reward_accuracy`` counts;
   0.5 for the SFT model by definition), how often a body scores higher after its own
   prompt than after the prompt it is the rejected side of (same body, so this isolates
   how much the model reads the prompt), the prompt contrast (each side's log-prob after
   this prompt minus after the other prompt it appears with, so the body's own likelihood
   cancels: what the SFT model's likelihood ratio separates once that is divided out),
   the own-reward and length-averaged accuracies on the first ``SEEN_PAIRS``
   training pairs of the shuffle with one rejected body each (how well each run fits
   what it trained on: the generalisation gap),
   and the own-reward accuracy on harder held-out pairs whose rejected body is the one
   next to the chosen body in length (so length tells nothing; reported apart, the
   benchmark's pairs stay "another function's body").

Also scores every pair set by a model-free baseline: the side whose body shares the larger
fraction of its identifiers with the prompt (how far plain name reuse separates the pairs).

Writes bench/results/<device>/preference.{json,md} (another shape than 64 x 2 adds
``-<width>x<layers>`` to the name, other ``--sft-steps`` / ``--sft-lr`` than 1200 / 3e-3
``-sft<N>`` / ``-sftlr<LR>``, other ``--steps`` than 150 ``-<steps>steps``, then
``-k<K>``, ``-bylength``, ``-beta<B>``, ``-lambda<L>``, ``-lrfull<LR>``, ``-lrlora<LR>`` for other
``--rejected``, ``--beta``, ``--orpo-lambda``, ``--lr-full``, ``--lr-lora`` than 1, 0.1, 0.1
and the defaults;
``--quick``: into ``<device>-quick``, nothing kept in ``<runs>`` but the inputs and
datasets); deterministic scores, no timings.
"""

import argparse
import hashlib
import json
import pathlib
import random
import re
import shutil
import tempfile

import numpy as np

from cadenza.config import load_config
from cadenza.models.checkpoint import is_model_dir
from cadenza.outputs import atomic_file
from cadenza.provenance import device_label, provenance, results_dir
from cadenza.train import fit
from cadenza.train.data import stdlib
from cadenza.train.merge import MergeSpec, merge_models
from cadenza.train.select import SelectSpec, select

HELDOUT_MODULES = 0.1
MAX_CHARS = 500          # prompt + body: well under SEQ_LEN tokens, so nothing is cut
SEQ_LEN = 256
LORA = ["peft.method=lora", "peft.rank=8", "peft.targets=.*_proj"]
LEARNING_RATE = {"full": 2e-4, "lora": 1e-3}   # DPO / ORPO peak defaults (cosine to 0.1x)
WARMUP = 20
SFT_STEPS, SFT_LR = 1200, 3e-3   # SFT defaults
SEEN_PAIRS = 200         # training pairs scored like the held-out ones (the fit)


def split_pairs():
    """``(train_modules, train_records, heldout_records)``: alpaca records of every
    instruction pair of the stdlib, split by module."""
    root, modules, train, held = stdlib.stdlib_root(), [], [], []
    for rel in stdlib.stdlib_files(None):
        heldout = stdlib.is_heldout(rel, HELDOUT_MODULES)
        if not heldout:
            modules.append(str(rel))
        try:
            found = stdlib.instruction_pairs((root / rel).read_text(encoding="utf-8"), rel)
        except (SyntaxError, UnicodeDecodeError):
            continue
        (held if heldout else train).extend(
            {"instruction": instruction, "output": body} for instruction, body, _ in found)
    return modules, train, held


def short_records(records):
    """The records whose instruction and body together are under ``MAX_CHARS``."""
    return [r for r in records if len(r["instruction"]) + len(r["output"]) < MAX_CHARS]


def usable(pair) -> bool:
    """A pair is kept when its rejected body differs from the chosen one and fits after the
    prompt too (so no side is cut)."""
    return (pair["chosen"] != pair["rejected"]
            and len(pair["prompt"]) + len(pair["rejected"]) < MAX_CHARS)


def preference_pairs(records, seed=0, rejected=1):
    """``{"prompt", "chosen", "rejected"}`` for the short records: each instruction with
    its own body and the body of the next short record in a seeded shuffle (never equal),
    kept where the prompt with the rejected body is short too (so no side is cut).
    ``rejected`` > 1 pairs each instruction with that many other bodies, the ``j``-th from
    a shuffle seeded ``seed + j`` (a body repeated for one prompt kept once); the pairs of
    ``j = 0`` come first, so the first pairs are those of ``rejected=1``."""
    short = short_records(records)
    pairs, seen = [], set()
    for j in range(rejected):
        order = list(range(len(short)))
        random.Random(seed + j).shuffle(order)
        for k, i in enumerate(order):
            p = {"prompt": short[i]["instruction"], "chosen": short[i]["output"],
                 "rejected": short[order[(k + 1) % len(order)]]["output"]}
            if usable(p) and (i, p["rejected"]) not in seen:
                seen.add((i, p["rejected"]))
                pairs.append(p)
    return pairs


def length_matched_pairs(records, rejected=1):
    """Harder pairs: each short record's instruction and body with, as the rejected
    side, the body of the short record ``j`` places after it by body length (``j`` = 1 ..
    ``rejected``; before it where none is after), kept like :func:`preference_pairs`."""
    short = sorted(short_records(records),
                   key=lambda r: (len(r["output"]), r["output"], r["instruction"]))
    pairs = [{"prompt": r["instruction"], "chosen": r["output"],
              "rejected": short[k + j if k + j < len(short) else k - j]["output"]}
             for j in range(1, rejected + 1) for k, r in enumerate(short)]
    return [p for p in pairs if usable(p)]


def model_overrides(width: int, layers: int) -> list[str]:
    """The tiny preset at hidden size ``width`` and ``layers`` layers (MLP 3x the width, 4
    heads, 2 key/value heads): ``width=64, layers=2`` is the preset unchanged."""
    return [f"model.hidden_size={width}", f"model.num_layers={layers}",
            f"model.intermediate_size={3 * width}", "model.num_heads=4", "model.num_kv_heads=2"]


def cached_input(folder: pathlib.Path, name: str, records) -> str:
    """``folder/<name>-<content hash>.jsonl`` holding ``records`` as JSON lines, written
    (atomically) only when absent: the same records give the same file, size and mtime,
    so the dataset prepared from it (keyed by those) is reused."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    path = folder / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    if not path.is_file():
        with atomic_file(path) as tmp:
            tmp.write_text(text)
    return str(path)


class Bench:
    """The shared overrides of every run (data dir, tokenizer modules, sequence length,
    model shape): inputs and prepared datasets under ``runs`` (kept), run outputs under
    ``tmp``."""

    def __init__(self, tmp: pathlib.Path, runs: pathlib.Path, modules: list[str],
                 model: list[str]):
        self.tmp, self.runs = tmp, runs
        self.common = [f"data.data_dir={runs / 'data'}", "data.heldout_fraction=0.0",
                       "data.stdlib_modules=[" + ",".join(modules) + "]",
                       f"train.seq_len={SEQ_LEN}", "train.tensorboard=false",
                       "train.progress_bar=false", "train.log_every=25",
                       "train.async_checkpoints=false", f"train.warmup_steps={WARMUP}",
                       *model]

    def trained(self, key: str, overrides: list[str], cache: bool) -> dict:
        """One training run (``{"model_dir", "adapters_dir", "last", "mean_tokens"}``: its
        last logged metrics and the mean of its logged steps' ``tokens``, pairs per step
        for DPO/ORPO), reused from ``<runs>/<key>`` when that holds a finished one
        (``cache``), else trained (and, with ``cache``, its outputs kept there, the
        checkpoints left out). ``key`` must name every setting that changes the run (the
        input files by their content hash; this script's constants are not in it)."""
        done = self.runs / key
        out = done if cache else self.tmp / key
        if not (cache and done.is_dir()):   # renamed into place once finished
            if cache:
                out = done.with_name(done.name + ".partial")
                shutil.rmtree(out, ignore_errors=True)   # an interrupted earlier run
            config = load_config(None, self.common + [f"train.output_dir={out}", *overrides],
                                 preset="tiny")
            summary = fit(config)
            if summary.get("step") != config.train.steps:   # stopped (a signal): not kept
                raise SystemExit(f"{key}: stopped at step {summary.get('step')} of "
                                 f"{config.train.steps}; rerun to train it")
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            if cache:
                out.rename(done)
                out = done
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {"model_dir": str(out / "model") if is_model_dir(out / "model") else None,
                "adapters_dir": str(out / "adapters") if (out / "adapters").is_dir() else None,
                "last": {k: v for m in metrics for k, v in m.items()},
                "mean_tokens": float(np.mean([m["tokens"] for m in metrics if "tokens" in m]))}

    def logps(self, model_dir: str, pairs, key: str) -> dict:
        """Summed response log-probs and token counts of both sides of every pair under
        ``model_dir``: ``{"chosen", "rejected", "chosen_n", "rejected_n"}`` arrays.
        ``key`` names the pair set (one scoring file per set). A model kept under
        ``runs`` keeps its scores next to it (``logps-<scoring file>.json``) for reruns."""
        path = pathlib.Path(cached_input(self.runs / "inputs", f"score_{key}", [
            {"instruction": p["prompt"], "output": p[side]}
            for p in pairs for side in ("chosen", "rejected")]))
        kept = pathlib.Path(model_dir).resolve().parent / f"logps-{path.stem}.json"
        if not kept.is_relative_to(self.runs.resolve()):
            kept = None
        elif kept.is_file():
            return {k: np.asarray(v, np.float64) for k, v in json.loads(kept.read_text()).items()}
        config = load_config(None, self.common + [
            "data.format=alpaca", f"data.path={path}", f"train.init_from={model_dir}"],
            preset="tiny")
        result = select(config, SelectSpec("nll", 1.0))
        nll, n = result["details"]["nll"], result["details"]["response_tokens"]
        found = {(r["messages"][0]["content"], r["messages"][1]["content"]): (-nll[i] * n[i], n[i])
                 for i, r in enumerate(result["records"])}
        out = {}
        for side in ("chosen", "rejected"):
            values = [found[(p["prompt"], p[side])] for p in pairs]
            out[side] = np.asarray([v[0] for v in values], np.float64)
            out[f"{side}_n"] = np.asarray([v[1] for v in values], np.float64)
        if not np.all(np.isfinite(out["chosen"]) & np.isfinite(out["rejected"])):
            raise SystemExit(f"{model_dir}: a pair side has no scored token")
        if kept is not None:
            with atomic_file(kept, overwrite=True) as tmp:
                tmp.write_text(json.dumps({k: v.tolist() for k, v in out.items()}))
        return out


def accuracy(chosen, rejected) -> float:
    """Fraction of pairs whose chosen score is higher (ties 1/2)."""
    return float(np.mean(np.where(chosen > rejected, 1.0,
                                  np.where(chosen == rejected, 0.5, 0.0))))


def identifiers(text: str) -> set[str]:
    """The distinct identifier-like words of ``text`` (names, keywords)."""
    return set(re.findall(r"[A-Za-z_]\w*", text))


def overlap_accuracy(pairs) -> float:
    """Pair accuracy of a model-free baseline: each side scored by the share of its
    body's distinct identifiers that also occur in the prompt (signature and docstring),
    so the body that reuses the prompt's names wins (ties 1/2)."""
    def share(prompt, body):
        words = identifiers(body)
        return len(words & identifiers(prompt)) / max(1, len(words))
    return accuracy(np.asarray([share(p["prompt"], p["chosen"]) for p in pairs]),
                    np.asarray([share(p["prompt"], p["rejected"]) for p in pairs]))


def scores(lp: dict, ref: dict, pairs) -> dict:
    """Pair accuracies of one model's log-probs ``lp`` of ``pairs`` (``ref``: the SFT
    model's); ``own_prompt``: a body's log-prob after its own prompt vs after the prompt of
    the pair it is rejected in (pairs whose rejected body is another pair's chosen one);
    ``prompt_contrast``: each side scored by its log-prob after this pair's prompt minus
    its log-prob after the other prompt it appears with (its own prompt for the rejected
    side, the prompt it is rejected under for the chosen side), so how likely the body is
    in itself cancels and only how much this prompt raises it counts."""
    mean_c, mean_r = lp["chosen"] / lp["chosen_n"], lp["rejected"] / lp["rejected_n"]
    own = {p["chosen"]: lp["chosen"][i] for i, p in enumerate(pairs)}
    other = {p["rejected"]: lp["rejected"][i] for i, p in enumerate(pairs)}
    same = np.asarray([(own[p["rejected"]], lp["rejected"][i]) for i, p in enumerate(pairs)
                       if p["rejected"] in own]).reshape(-1, 2)
    contrast = np.asarray([(lp["chosen"][i] - other[p["chosen"]],
                            lp["rejected"][i] - own[p["rejected"]])
                           for i, p in enumerate(pairs)
                           if p["chosen"] in other and p["rejected"] in own]).reshape(-1, 2)
    return {"mean_logp": accuracy(mean_c, mean_r), "own_prompt": accuracy(*same.T),
            "prompt_contrast": accuracy(*contrast.T),
            "sum_logp": accuracy(lp["chosen"], lp["rejected"]),
            "dpo_reward": accuracy(lp["chosen"] - ref["chosen"],
                                   lp["rejected"] - ref["rejected"]),
            "mean_logp_margin": float(np.mean(mean_c - mean_r))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64, help="model hidden size")
    parser.add_argument("--layers", type=int, default=2, help="model layers")
    parser.add_argument("--sft-steps", type=int, default=SFT_STEPS, help="SFT steps")
    parser.add_argument("--sft-lr", type=float, default=SFT_LR, help="SFT peak learning rate")
    parser.add_argument("--steps", type=int, default=150, help="steps of each DPO/ORPO run")
    parser.add_argument("--lr-full", type=learning_rates, default=[LEARNING_RATE["full"]],
                        help="DPO/ORPO peak learning rate(s), full fine-tuning (comma-separated:"
                             " one run each)")
    parser.add_argument("--lr-lora", type=learning_rates, default=[LEARNING_RATE["lora"]],
                        help="DPO/ORPO peak learning rate(s), LoRA")
    parser.add_argument("--train-only", action="store_true",
                        help="train (or reuse) the runs, then stop: no scores, no results "
                             "(to train runs in parallel processes before one scoring run)")
    parser.add_argument("--runs", default="runs/preference_bench",
                        help="finished runs, their scores, inputs and prepared datasets "
                             "(kept; reruns reuse them)")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    parser.add_argument("--orpo-lambda", type=float, default=0.1,
                        help="ORPO's weight of the odds-ratio term")
    parser.add_argument("--rejected", type=int, default=1,
                        help="rejected bodies per training prompt (each another function's)")
    parser.add_argument("--rejected-by", choices=("shuffle", "length"), default="shuffle",
                        help="training pairs' rejected bodies: from a seeded shuffle (the "
                             "benchmark's pairs), or the bodies next in length (harder)")
    parser.add_argument("--methods", default="full,lora",
                        help="comma-separated fine-tuning methods of the DPO/ORPO runs")
    parser.add_argument("--tasks", default="dpo,orpo",
                        help="comma-separated preference tasks (dpo, orpo)")
    parser.add_argument("--quick", action="store_true", help="a few steps (a smoke run)")
    parser.add_argument("--out", default=None, help="results folder")
    args = parser.parse_args()
    sft_steps, steps = (3, 3) if args.quick else (args.sft_steps, args.steps)
    if args.rejected < 1:
        raise SystemExit(f"--rejected {args.rejected}: give 1 or more")
    if not set(args.tasks.split(",")) <= {"dpo", "orpo"}:
        raise SystemExit(f"--tasks {args.tasks}: give dpo, orpo or dpo,orpo")
    if not set(args.methods.split(",")) <= {"full", "lora"}:
        raise SystemExit(f"--methods {args.methods}: give full, lora or full,lora")
    out = results_dir(__file__, args.out or (pathlib.Path(__file__).resolve().parent / "results"
                                             / f"{device_label()}-quick" if args.quick
                                             else None))
    stem = "preference" + ("" if (args.width, args.layers) == (64, 2) else
                           f"-{args.width}x{args.layers}") + \
        ("" if args.sft_steps == SFT_STEPS else f"-sft{args.sft_steps}") + \
        ("" if args.sft_lr == SFT_LR else f"-sftlr{args.sft_lr:g}") + \
        ("" if args.steps == 150 else f"-{args.steps}steps") + \
        ("" if args.rejected == 1 else f"-k{args.rejected}") + \
        ("" if args.rejected_by == "shuffle" else f"-by{args.rejected_by}") + \
        ("" if args.beta == 0.1 else f"-beta{args.beta:g}") + \
        ("" if args.orpo_lambda == 0.1 else f"-lambda{args.orpo_lambda:g}") + \
        "".join(f"-lr{m}{'_'.join(f'{x:g}' for x in rates)}"
                for m, rates in (("full", args.lr_full), ("lora", args.lr_lora))
                if rates != [LEARNING_RATE[m]])
    with tempfile.TemporaryDirectory(prefix="preference_") as tmp:
        result = measure(args, sft_steps, steps, pathlib.Path(tmp), pathlib.Path(args.runs))
    if result is None:
        return
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = markdown(result)
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def learning_rates(text: str) -> list[float]:
    """``--lr-full`` / ``--lr-lora``: comma-separated positive learning rates."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive numbers, e.g. 1e-4,3e-4")
    return values


def measure(args, sft_steps: int, steps: int, tmp: pathlib.Path,
            runs: pathlib.Path) -> dict | None:
    """Train (or reuse from ``runs``) the SFT model and every DPO/ORPO run of ``args``,
    score the held-out and the first training pairs under each; the results record
    (None with ``args.train_only``: after training)."""
    methods, tasks = args.methods.split(","), args.tasks.split(",")
    lr = {"full": args.lr_full, "lora": args.lr_lora}
    modules, sft_records, held_records = split_pairs()
    train_pairs = (preference_pairs if args.rejected_by == "shuffle" else
                   length_matched_pairs)(sft_records, rejected=args.rejected)
    held_pairs, held_len = preference_pairs(held_records), length_matched_pairs(held_records)
    bench = Bench(tmp, runs, modules, model_overrides(args.width, args.layers))
    parameters = load_config(None, bench.common, preset="tiny").model.num_params()
    files = {"sft": cached_input(runs / "inputs", "sft", sft_records),
             "pairs": cached_input(runs / "inputs", "pairs", train_pairs)}
    shape, cache = f"{args.width}x{args.layers}", not args.quick
    digest = {k: pathlib.Path(v).stem.rsplit("-", 1)[1] for k, v in files.items()}
    sft_key = f"sft-{shape}-{sft_steps}-lr{args.sft_lr:g}-{digest['sft']}"
    sft = bench.trained(sft_key, ["data.format=alpaca", f"data.path={files['sft']}",
                                  f"train.steps={sft_steps}",
                                  f"train.learning_rate={args.sft_lr}"], cache)
    models = {"sft": sft["model_dir"]}
    train_logs = {"sft": {"loss": sft["last"]["loss"]}}
    pref = ["data.format=preference", f"data.path={files['pairs']}", "train.batch_size=8",
            f"train.seq_len={2 * SEQ_LEN}", f"train.steps={steps}",
            f"train.init_from={sft['model_dir']}", f"train.preference.beta={args.beta}",
            f"train.preference.orpo_lambda={args.orpo_lambda}"]
    for task, method, rate in ((t, m, x) for t in tasks for m in methods for x in lr[m]):
        extra = LORA if method == "lora" else []
        name = f"{task} {method}" + (f" lr {rate:g}" if len(lr[method]) > 1 else "")
        setting = f"beta{args.beta:g}" if task == "dpo" else (
            "" if args.orpo_lambda == 0.1 else f"lambda{args.orpo_lambda:g}")
        r = bench.trained(f"{sft_key}-{task}-{method}-{steps}-lr{rate:g}-"
                          + (f"{setting}-" if setting else "") + digest["pairs"],
                          pref + [f"train.task={task}", f"train.learning_rate={rate}", *extra],
                          cache)
        if not args.train_only:
            model = r["model_dir"]
            if model is None:   # adapters alone: fold them into the SFT model to score it
                model = str(tmp / name.replace(" ", "_"))
                merge_models(sft["model_dir"], [r["adapters_dir"]], model, MergeSpec("linear"))
            models[name] = model
            train_logs[name] = {**{k: r["last"].get(k) for k in
                                   ("loss", "reward_accuracy", "reward_margin")},
                                "epochs": steps * r["mean_tokens"] / len(train_pairs)}
    if args.train_only:
        return None
    seen = preference_pairs(sft_records)[:SEEN_PAIRS]   # the same for every --rejected
    ref_held = bench.logps(models["sft"], held_pairs, "heldout")
    ref_seen = bench.logps(models["sft"], seen, "train")
    ref_len = bench.logps(models["sft"], held_len, "heldout_length_matched")
    table = {}
    for name, model in models.items():
        held = ref_held if name == "sft" else bench.logps(model, held_pairs, "heldout")
        own = ref_seen if name == "sft" else bench.logps(model, seen, "train")
        matched = ref_len if name == "sft" else bench.logps(model, held_len,
                                                            "heldout_length_matched")
        table[name] = {"heldout": scores(held, ref_held, held_pairs),
                       "heldout_length_matched": scores(matched, ref_len, held_len),
                       "train_pairs": scores(own, ref_seen, seen),
                       "train_log": train_logs[name]}
    result = {**provenance(), "quick": args.quick, "sft_steps": sft_steps, "steps": steps,
              "model": {"hidden_size": args.width, "num_layers": args.layers,
                        "parameters": parameters},
              "sft_learning_rate": args.sft_lr, "learning_rate": lr, "warmup_steps": WARMUP,
              "beta": args.beta, "orpo_lambda": args.orpo_lambda,
              "rejected_per_prompt": args.rejected, "rejected_by": args.rejected_by,
              "tasks": tasks, "methods": methods,
              "seq_len": SEQ_LEN, "max_chars": MAX_CHARS,
              "heldout_module_fraction": HELDOUT_MODULES,
              "counts": {"sft_records": len(sft_records), "train_pairs": len(train_pairs),
                         "heldout_pairs": len(held_pairs),
                         "heldout_length_matched_pairs": len(held_len),
                         "train_modules": len(modules)},
              "identifier_overlap": {"heldout": overlap_accuracy(held_pairs),
                                     "heldout_length_matched": overlap_accuracy(held_len),
                                     "train_pairs": overlap_accuracy(seen)},
              "models": table}
    return result


def rates(values: list[float]) -> str:
    """Learning rates as text: ``0.0002`` or ``0.0001 / 0.0003``."""
    return " / ".join(f"{v:g}" for v in values)


def markdown(result: dict) -> list[str]:
    """The results table of ``result`` (from :func:`measure`) as markdown lines."""
    lr, counts = result["learning_rate"], result["counts"]
    model = result["model"]
    own = {name: "dpo_reward" if name.startswith("dpo") else "mean_logp"
           for name in result["models"]}
    lines = [f"# DPO / ORPO on stdlib preference pairs ({result['device_kind']}, jax "
             f"{result['jax']}, commit {result['commit']}, {result['date']}, load "
             f"{result['load_avg_1m']:.1f})", "",
             f"Tiny preset at hidden size {model['hidden_size']}, {model['num_layers']} "
             f"layers ({model['parameters'] / 1e6:.2f}M parameters), SFT "
             f"{result['sft_steps']} steps (learning rate {result['sft_learning_rate']:g}) on "
             f"{counts['sft_records']} instruction pairs of {counts['train_modules']} training "
             f"modules; DPO (beta {result['beta']}) / ORPO (lambda {result['orpo_lambda']}) "
             f"{result['steps']} steps of 8 rows x "
             f"{2 * SEQ_LEN} positions (learning rate "
             + ", ".join(f"{rates(lr[m])} {'LoRA' if m == 'lora' else m}"
                         for m in result["methods"])
             + f", {WARMUP} warmup steps, cosine) on {counts['train_pairs']} training pairs "
             f"(chosen = true body, rejected = another function's body; "
             f"{result['rejected_per_prompt']} rejected bod"
             f"{'y' if result['rejected_per_prompt'] == 1 else 'ies'} per prompt"
             + (", the bodies next in length" if result["rejected_by"] == "length" else "")
             + "); "
             f"{counts['heldout_pairs']} held-out pairs from held-out modules (one "
             f"rejected body each), and {counts['heldout_length_matched_pairs']} "
             f"length-matched ones (rejected: the body next in length); training "
             f"pairs scored: the first {SEEN_PAIRS} of the shuffled set with one rejected "
             f"body per prompt.", "",
             "| model | epochs | held-out: own reward acc. | mean log-prob acc. | "
             "summed log-prob acc. | DPO reward acc. | prompt-contrast acc. | body: own vs "
             "other prompt | training pairs: own reward acc. | training pairs: mean log-prob "
             "acc. | length-matched held-out: own reward acc. |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in result["models"].items():
        h, t, m = row["heldout"], row["train_pairs"], row["heldout_length_matched"]
        epochs = row["train_log"].get("epochs")
        lines.append(f"| {name} | {'-' if epochs is None else f'{epochs:.2f}'} | "
                     f"{h[own[name]]:.3f} | {h['mean_logp']:.3f} | {h['sum_logp']:.3f} | "
                     f"{h['dpo_reward']:.3f} | {h['prompt_contrast']:.3f} | "
                     f"{h['own_prompt']:.3f} | {t[own[name]]:.3f} | {t['mean_logp']:.3f} | "
                     f"{m[own[name]]:.3f} |")
    lines += ["", "Own reward: DPO's implicit reward (log-ratio to the SFT model) for DPO, the "
                  "length-averaged log-prob for ORPO and the SFT baseline. Prompt-contrast: "
                  "each side's log-prob after this prompt minus after the other prompt it "
                  "appears with in the set (the body's own likelihood cancels). Epochs: passes "
                  "over the training pairs (steps x mean pairs per logged step). ORPO's log-odds "
                  "ratio is monotone in the length-averaged log-prob, so its own reward "
                  "accuracy is also the accuracy of its odds ratio."]
    if "identifier_overlap" in result:
        o = result["identifier_overlap"]
        lines += ["", "Model-free baseline (no training): the side whose body shares the larger "
                      "fraction of its distinct identifiers with the prompt wins: "
                      f"{o['heldout']:.3f} held-out, {o['train_pairs']:.3f} on the training "
                      f"pairs, {o['heldout_length_matched']:.3f} length-matched held-out."]
    return lines


if __name__ == "__main__":
    main()
