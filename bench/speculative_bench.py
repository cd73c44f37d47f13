"""Speculative decoding family vs plain greedy decoding of the target, side by side in one run.

Run: ``.venv/bin/python bench/speculative_bench.py [--target-steps 300] [--draft-steps 300]``.

Both models are trained by cadenza (:func:`cadenza.train.fit`, the
``tiny_pretrain`` experiment on the stdlib code data with its BPE tokenizer)
unless ``runs/spec_bench/{target,draft}/model`` exist: the target is a
4-layer, 256-wide model, the draft the 2-layer, 64-wide ``tiny`` preset.
Prompts are windows of stdlib source files encoded with the target's
tokenizer. After a warm-up call of each (compiling), it times plain greedy
decoding of the target and of the draft, then every speculative method
(draft model with fixed gamma, adaptive confidence rule, prompt lookup,
Medusa with heads trained here on the target's data, ``--medusa-steps``),
checks each output equals plain greedy token for token, and reports decode
tokens/s, speedup over plain greedy, mean accepted tokens per target
forward, acceptance per draft position and the speedup predicted from those
numbers with the measured cost ratio c = t_draft / t_target (per token of
plain greedy). Results: ``bench/results/cpu/speculative_bench.{json,md}``.
"""

import argparse
import dataclasses
import datetime
import json
import pathlib
import subprocess
import sysconfig

import jax

from cadenza.config import load_config
from cadenza.decode import DecodeConfig, generate
from cadenza.decode.adaptive import StopRule
from cadenza.decode.medusa import Medusa
from cadenza.decode.ngram_draft import PromptLookup
from cadenza.decode.speculative import DraftModel, speculative_generate
from cadenza.models import Transformer, load_model
from cadenza.models.checkpoint import tokenizer_dir
from cadenza.models.tokenizer import load_tokenizer

RUNS = pathlib.Path("runs/spec_bench")
TARGET = ["model.hidden_size=256", "model.num_layers=4", "model.num_heads=8",
          "model.num_kv_heads=4", "model.intermediate_size=768"]
PROMPT_FILES = ("calendar.py", "locale.py", "pprint.py", "reprlib.py")


def trained(name: str, overrides: list[str], steps: int) -> pathlib.Path:
    """The model directory of ``runs/spec_bench/<name>``, trained with fit if absent."""
    model_dir = RUNS / name / "model"
    if not (model_dir / "config.yaml").exists():
        from cadenza.train.trainer import fit

        config = load_config("tiny_pretrain", overrides + [
            f"train.output_dir={RUNS / name}", f"train.steps={steps}", "train.eval_every=0",
            f"train.checkpoint_every={steps}", f"train.log_every={steps}"])
        summary = fit(config)
        print(f"trained {name}: loss {summary['loss']:.3f}")
    return model_dir


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out = []
    for f in PROMPT_FILES[:n]:
        text = (lib / f).read_text()
        ids = tokenizer.encode(text[len(text) // 2:], add_bos=True)
        out.append(ids[:length])
    return out


def medusa_heads(target, tparams, tcfg, num_heads: int, steps: int):
    """Medusa-1 heads trained on the target's training data (base frozen)."""
    from cadenza.train.data import build_iterator
    from cadenza.train.medusa_task import train_medusa_heads

    batches = (b["inputs"] for b in build_iterator(tcfg))
    heads, losses = train_medusa_heads(target, tparams, batches, num_heads=num_heads,
                                       steps=steps, learning_rate=3e-3)
    print(f"medusa heads: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return heads


def run_twice(fn):
    fn()                       # warm-up: compiles
    return fn()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-steps", type=int, default=300)
    parser.add_argument("--draft-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--medusa-steps", type=int, default=60)
    parser.add_argument("--out", default="bench/results/cpu")
    args = parser.parse_args()

    tdir = trained("target", TARGET, args.target_steps)
    ddir = trained("draft", [], args.draft_steps)
    (tcfg, tparams), (dcfg, dparams) = load_model(tdir), load_model(ddir)
    target, draft = Transformer(tcfg.model), Transformer(dcfg.model)
    tok = load_tokenizer(tokenizer_dir(tdir))
    ids = prompts(tok, args.batch, args.prompt_len)
    cfg = DecodeConfig(max_new_tokens=args.new_tokens, ignore_eos=True)

    plain = run_twice(lambda: generate(target, tparams, ids, cfg))
    plain_draft = run_twice(lambda: generate(draft, dparams, ids, cfg))
    base_tps = plain.stats["decode_tokens_per_s"]
    c = base_tps / plain_draft.stats["decode_tokens_per_s"]
    rows = [{"method": "plain greedy (target)", "tokens_per_s": base_tps, "speedup": 1.0,
             "identical": True},
            {"method": "plain greedy (draft)",
             "tokens_per_s": plain_draft.stats["decode_tokens_per_s"],
             "speedup": plain_draft.stats["decode_tokens_per_s"] / base_tps, "identical": None}]
    methods = [(f"draft gamma={g}", DraftModel(dcfg.model, g)) for g in (2, 4, 6)]
    methods += [("draft adaptive (confidence, max 8)",
                 DraftModel(dcfg.model, 8, stop=StopRule("confidence")))]
    methods += [(f"prompt lookup gamma={g}", PromptLookup(gamma=g)) for g in (4, 8)]
    medusa = Medusa()
    heads = medusa_heads(target, tparams, tcfg, medusa.num_heads, args.medusa_steps)
    methods += [(f"medusa ({len(medusa.paths)}-node tree, {args.medusa_steps} head steps)",
                 medusa)]
    for name, drafter in methods:
        dp = ((dparams, None) if isinstance(drafter, DraftModel)
              else heads if isinstance(drafter, Medusa) else None)
        cost = c if isinstance(drafter, DraftModel) else 0.0
        res = run_twice(lambda d=drafter, dp=dp, cost=cost: speculative_generate(
            target, tparams, ids, cfg, drafter=d, draft_params=dp, cost_ratio=cost))
        s = res.stats
        rows.append({"method": name, "tokens_per_s": s["decode_tokens_per_s"],
                     "speedup": s["decode_tokens_per_s"] / base_tps,
                     "predicted_speedup": s["predicted_speedup"],
                     "identical": res.token_ids == plain.token_ids,
                     "mean_accepted_per_forward": s["mean_accepted_per_forward"],
                     "mean_draft_length": s["mean_draft_length"],
                     "acceptance_per_position": s["acceptance_per_position"]})
        print(rows[-1])

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    report = {
        "benchmark": "speculative_vs_plain_greedy", "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform, "jax": jax.__version__, "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "target": dataclasses.asdict(tcfg.model), "draft": dataclasses.asdict(dcfg.model),
        "target_steps": args.target_steps, "draft_steps": args.draft_steps,
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "cost_ratio_measured": c, "rows": rows,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculative_bench.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [
        "# Speculative decoding vs plain greedy (target)", "",
        f"device {report['device']} ({report['platform']}), jax {jax.__version__}, commit "
        f"{commit}, {report['date']}; batch {args.batch}, prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens; measured c = t_draft/t_target = {c:.3f}", "",
        "| method | tokens/s | speedup | predicted | identical to greedy | accepted/forward "
        "| mean draft len | acceptance per position |",
        "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = r.get("acceptance_per_position")
        acc = " ".join("-" if a is None else f"{a:.2f}" for a in acc) if acc else ""
        pred = r.get("predicted_speedup")
        lines.append(
            f"| {r['method']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
            f"{'' if pred is None else f'{pred:.2f}x'} | {r['identical']} | "
            f"{r.get('mean_accepted_per_forward', '') and round(r['mean_accepted_per_forward'], 2)}"
            f" | {r.get('mean_draft_length', '') and round(r['mean_draft_length'], 2)} | {acc} |")
    (out / "speculative_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
