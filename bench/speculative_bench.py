"""Speculative decoding family vs plain greedy decoding of the target, side by side in one run.

Run: ``.venv/bin/python bench/speculative_bench.py [--target-steps 200] [--draft-steps 400]``.

Both models are trained by cadenza (:func:`cadenza.train.fit`, the
``tiny_pretrain`` experiment on the stdlib code data with its BPE tokenizer)
unless ``<runs>/{target,draft}/model`` exist (``--runs``, default
``runs/spec_bench``, so reruns skip training): the target is a 4-layer,
256-wide model, the draft the 2-layer, 64-wide ``tiny`` preset (about 20x
fewer parameters). Both are served in ``--dtype`` (default float32; with
bfloat16 the params are cast after loading, the plain greedy baseline uses the
same cast target and a float32 greedy row is shown for reference; measured:
bfloat16 verify forwards over T tokens round differently from one-token steps,
so greedy outputs diverge from plain greedy at near-ties). Prompts are windows of stdlib
source files, decoded one at a time (``--batch`` rows per call).

Each of ``--repeats`` rounds runs every method once, interleaved (the machine
is shared, so methods are compared within a round and the median over rounds
is reported): plain greedy of the target, draft model with fixed gamma, the
adaptive confidence rule, prompt lookup (n-gram) and Medusa
(heads trained here, ``--medusa-steps``; 0 skips it). Each output is checked token for token
against plain greedy. Reported per method: decode tokens/s (prefill
excluded), speedup, accepted tokens per target forward, acceptance per draft
position, and two predicted speedups: the library's (a verify forward costs
one greedy step) and one from the measured cost of a forward over ``T``
tokens (``fwd(T)/fwd(1)``, table below the results). A second table measures
``fwd(T)/fwd(1)`` for randomly initialised models of several sizes in float32
and bfloat16, which says when a verify forward is nearly free on this device.
Results: ``bench/results/<device>/speculative_bench.{json,md}``
(``speculative_bench_bfloat16.*`` in bfloat16). ``--sweep-only`` runs the second
table alone (no training, no data pipeline: what scripts/gpu_check.py runs on a GPU)
into ``speculative_sweep.{json,md}``.
"""

import argparse
import dataclasses
import json
import pathlib
import statistics
import sysconfig
import time

import jax
import jax.numpy as jnp

from cadenza.config import load_config
from cadenza.decode import DecodeConfig, generate
from cadenza.decode.prompt_lookup import PromptLookup
from cadenza.decode.specdec_head import StopRule
from cadenza.decode.speculative import DraftModel, speculative_generate
from cadenza.decode.verify import verify
from cadenza.models import KVCache, Transformer, init_params, load_model
from cadenza.models.checkpoint import tokenizer_dir
from cadenza.models.tokenizer import load_tokenizer
from cadenza.provenance import provenance, results_dir

TARGET = ["model.hidden_size=256", "model.num_layers=4", "model.num_heads=8",
          "model.num_kv_heads=4", "model.intermediate_size=768"]
PROMPT_FILES = ("calendar.py", "locale.py", "pprint.py", "reprlib.py", "textwrap.py",
                "fnmatch.py", "heapq.py", "bisect.py")
# Sizes of the forward-cost sweep (random init): name -> model overrides.
SWEEP = {
    "quickstart target (4L d128)": ["model.num_layers=4", "model.hidden_size=128",
                                    "model.num_heads=4", "model.num_kv_heads=2",
                                    "model.intermediate_size=384"],
    "bench target (4L d256)": TARGET + ["model.vocab_size=512"],
    "6L d512, vocab 2048": ["model.num_layers=6", "model.hidden_size=512", "model.num_heads=8",
                            "model.num_kv_heads=4", "model.intermediate_size=1536",
                            "model.vocab_size=2048"],
}


def trained(runs: pathlib.Path, name: str, overrides: list[str], steps: int) -> pathlib.Path:
    """The model directory ``<runs>/<name>-<steps>steps/model``, trained with fit if absent
    (so a run with other step counts, e.g. ``--quick``, never reuses these)."""
    out = runs / f"{name}-{steps}steps"
    model_dir = out / "model"
    config = load_config("tiny_pretrain", overrides + [
        f"train.output_dir={out}", f"train.steps={steps}", "train.eval_every=0",
        f"train.checkpoint_every={steps}", f"train.log_every={steps}"])
    if not (model_dir / "config.yaml").exists():
        from cadenza.train.trainer import fit

        summary = fit(config)
        print(f"trained {name}: loss {summary['loss']:.3f}")
    return model_dir


def serving(model_config, params, dtype: str):
    """The model config and params cast to ``dtype`` for decoding (compute and params)."""
    cfg = dataclasses.replace(model_config, dtype=dtype, param_dtype=dtype)
    return cfg, jax.tree.map(lambda x: x.astype(dtype), params)


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out = []
    for f in PROMPT_FILES[:n]:
        text = (lib / f).read_text()
        ids = tokenizer.encode(text[len(text) // 2:], add_bos=True)
        out.append(ids[:length])
    return out


def forward_seconds(model: Transformer, params, tokens: int, prefix: int, max_len: int,
                    iters: int, repeats: int) -> float:
    """Median seconds of one cached forward over ``tokens`` new tokens per row (batch 1)
    after ``prefix`` cached tokens: ``iters`` forwards in one jitted loop, ``repeats`` times."""
    def run(params, cache):
        def body(i, carry):
            cache, acc = carry
            new = jnp.full((1, tokens), i % 7, jnp.int32)
            logits, _, cache = verify(model, params, cache.with_lengths(prefix), new)
            return cache, acc + logits[0, -1, 0]
        return jax.lax.fori_loop(0, iters, body, (cache, jnp.float32(0)))[1]

    fn = jax.jit(run)
    cache = KVCache.create(model.config, 1, max_len)
    jax.block_until_ready(fn(params, cache))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, cache))
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def cost_sweep(tokens: list[int], repeats: int) -> list[dict]:
    """fwd(T)/fwd(1) for the :data:`SWEEP` sizes (random init) in float32 and bfloat16."""
    rows = []
    for name, overrides in SWEEP.items():
        for dtype in ("float32", "bfloat16"):
            cfg = load_config("tiny_pretrain", overrides + [f"model.dtype={dtype}",
                                                            f"model.param_dtype={dtype}"]).model
            params = init_params(cfg, jax.random.key(0), mesh=None, rules=None)
            model = Transformer(cfg)
            iters = 20 if cfg.num_params() > 1e7 else 100
            secs = {t: forward_seconds(model, params, t, 160, 256, iters, repeats)
                    for t in tokens}
            rows.append({"model": name, "params": cfg.num_params(), "dtype": dtype,
                         "fwd_ms": {t: s * 1e3 for t, s in secs.items()},
                         "ratio": {t: s / secs[1] for t, s in secs.items()}})
            print(rows[-1])
    return rows


def medusa_heads(target, tparams, tcfg, num_heads: int, steps: int):
    """Medusa-1 heads trained on the target's training data (base frozen)."""
    from cadenza.train.data import build_iterator
    from cadenza.train.medusa_task import train_medusa_heads

    batches = (b["inputs"] for b in build_iterator(tcfg))
    heads, losses = train_medusa_heads(target, tparams, batches, num_heads=num_heads,
                                       steps=steps, learning_rate=3e-3)
    print(f"medusa heads: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return heads


def decode_all(fn, batches):
    """Run ``fn(batch)`` per batch; (token ids, decode seconds, tokens decoded, stats list)."""
    ids, secs, decoded, stats = [], 0.0, 0, []
    for batch in batches:
        res = fn(batch)
        ids += res.token_ids
        secs += res.stats["decode_s"]
        decoded += sum(len(t) - 1 for t in res.token_ids)   # the first token comes from prefill
        stats.append(res.stats)
    return ids, secs, decoded, stats


def _meta(args) -> dict:
    return {"benchmark": "speculative_vs_plain_greedy", **provenance(),
            **{k: v for k, v in vars(args).items() if k != "out"}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-steps", type=int, default=200)
    parser.add_argument("--draft-steps", type=int, default=400)
    parser.add_argument("--runs", default="runs/spec_bench", help="trained models (cached)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1, help="rows per decode call")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--gammas", default="2,4,6")
    parser.add_argument("--ngram-gammas", default="4,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--medusa-steps", type=int, default=200, help="0 = no Medusa row")
    parser.add_argument("--no-sweep", action="store_true", help="skip the size sweep")
    parser.add_argument("--sweep-only", action="store_true",
                        help="only the fwd(T)/fwd(1) size sweep (random init, no training)")
    parser.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = parser.parse_args()
    if args.sweep_only:
        return write_sweep(args, cost_sweep([1, 3, 5, 9], args.repeats))

    runs = pathlib.Path(args.runs)
    tdir = trained(runs, "target", TARGET, args.target_steps)
    ddir = trained(runs, "draft", [], args.draft_steps)
    (tcfg, tparams32), (dcfg, dparams32) = load_model(tdir), load_model(ddir)
    tmodel_cfg, tparams = serving(tcfg.model, tparams32, args.dtype)
    dmodel_cfg, dparams = serving(dcfg.model, dparams32, args.dtype)
    target, draft = Transformer(tmodel_cfg), Transformer(dmodel_cfg)
    tok = load_tokenizer(tokenizer_dir(tdir))
    ids = prompts(tok, args.prompts, args.prompt_len)
    batches = [ids[i:i + args.batch] for i in range(0, len(ids), args.batch)]
    cfg = DecodeConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    gammas = [int(g) for g in args.gammas.split(",") if g]
    ngram_gammas = [int(g) for g in args.ngram_gammas.split(",") if g]

    # name -> (fn(batch) -> GenerateResult, is speculative, drafter)
    methods = {"plain greedy (target)": (lambda b: generate(target, tparams, b, cfg), None)}
    if args.dtype != "float32":
        t32 = Transformer(tcfg.model)
        methods["plain greedy (target, float32)"] = (
            lambda b: generate(t32, tparams32, b, cfg), None)
    methods["plain greedy (draft)"] = (lambda b: generate(draft, dparams, b, cfg), None)
    drafters = [(f"draft gamma={g}", DraftModel(dmodel_cfg, g), (dparams, None)) for g in gammas]
    drafters += [("draft adaptive (confidence, max 6)",
                  DraftModel(dmodel_cfg, 6, stop=StopRule("confidence")), (dparams, None))]
    drafters += [(f"n-gram (prompt lookup) gamma={g}", PromptLookup(gamma=g), None)
                 for g in ngram_gammas]
    if args.medusa_steps:
        from cadenza.decode.medusa import Medusa

        medusa = Medusa()
        heads = medusa_heads(Transformer(tcfg.model), tparams32, tcfg, medusa.num_heads,
                             args.medusa_steps)
        drafters += [(f"medusa ({len(medusa.paths)}-node tree, {args.medusa_steps} head "
                      f"steps)", medusa, jax.tree.map(lambda x: x.astype(args.dtype), heads))]
    for name, drafter, dp in drafters:
        methods[name] = (lambda b, d=drafter, dp=dp: speculative_generate(
            target, tparams, b, cfg, drafter=d, draft_params=dp, cost_ratio=0.0), drafter)

    outputs, tps = {}, {name: [] for name in methods}
    for name, (fn, _) in methods.items():                # warm-up: compiles every program
        outputs[name] = decode_all(fn, batches)
    for r in range(args.repeats):
        for name, (fn, _) in methods.items():
            _, secs, decoded, _ = decode_all(fn, batches)
            tps[name].append(decoded / secs)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(
            f"{n} {v[-1]:.0f}" for n, v in tps.items()))

    # Measured cost of a target forward over T tokens (same prefix length as the prompts).
    max_gamma = max(gammas + ngram_gammas + [6])
    costs = {t: forward_seconds(target, tparams, t, args.prompt_len + args.new_tokens // 2,
                                args.prompt_len + args.new_tokens + max_gamma + 1, 100,
                                args.repeats) for t in range(1, max_gamma + 2)}
    draft_step = forward_seconds(draft, dparams, 1, args.prompt_len + args.new_tokens // 2,
                                 args.prompt_len + args.new_tokens + max_gamma + 1, 100,
                                 args.repeats)
    c = draft_step / costs[1]
    base = statistics.median(tps["plain greedy (target)"])
    best_plain = max(statistics.median(tps[n]) for n in methods
                     if n.startswith("plain greedy (target"))
    greedy_ids = outputs["plain greedy (target)"][0]
    rows = []
    for name, (fn, drafter) in methods.items():
        med = statistics.median(tps[name])
        row = {"method": name, "tokens_per_s": med, "tokens_per_s_rounds": tps[name],
               "speedup": med / base, "speedup_vs_best_plain_greedy": med / best_plain}
        if drafter is None:
            row["identical"] = True if name == "plain greedy (target)" else None
            rows.append(row)
            continue
        out_ids, _, decoded, stats = outputs[name]
        forwards = sum(s["target_forwards"] for s in stats)
        proposed = sum(s["mean_draft_length"] * s["target_forwards"] for s in stats)
        per_forward = decoded / forwards
        mean_draft = proposed / forwards
        per_pos = [[s["acceptance_per_position"][i] for s in stats
                    if s["acceptance_per_position"][i] is not None]
                   for i in range(drafter.gamma)]
        verify_ratio = costs[min(drafter.gamma + 1, max(costs))] / costs[1]
        draft_c = c if isinstance(drafter, DraftModel) else 0.0
        row.update({
            "identical": out_ids == greedy_ids, "mean_accepted_per_forward": per_forward,
            "mean_draft_length": mean_draft,
            "acceptance_per_position": [statistics.mean(p) if p else None for p in per_pos],
            "predicted_speedup_verify_1_step": per_forward / (mean_draft * draft_c + 1.0),
            "verify_cost_ratio": verify_ratio,
            "predicted_speedup_measured_costs": per_forward / (mean_draft * draft_c
                                                               + verify_ratio)})
        rows.append(row)
    sweep = [] if args.no_sweep else cost_sweep([1, 3, 5, 9], args.repeats)

    report = {"meta": _meta(args), "target": dataclasses.asdict(tmodel_cfg),
              "draft": dataclasses.asdict(dmodel_cfg),
              "target_params": tmodel_cfg.num_params(), "draft_params": dmodel_cfg.num_params(),
              "forward_ms": {t: s * 1e3 for t, s in costs.items()},
              "draft_forward_ms": draft_step * 1e3, "cost_ratio_draft": c, "rows": rows,
              "cost_sweep": sweep}
    out = results_dir(__file__, args.out)
    stem = "speculative_bench" + ("" if args.dtype == "float32" else f"_{args.dtype}")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    (out / f"{stem}.md").write_text(render(report))
    print(render(report))


def write_sweep(args, sweep: list[dict]) -> int:
    """``speculative_sweep.{json,md}``: the size sweep alone, stamped."""
    meta = _meta(args)
    out = results_dir(__file__, args.out)
    (out / "speculative_sweep.json").write_text(json.dumps({"meta": meta, "cost_sweep": sweep},
                                                           indent=2, default=str))
    lines = _sweep_table(sweep)
    head = [f"# Forward over T tokens vs one token on {meta['device_kind']}", "",
            f"jax {meta['jax']}, commit {meta['commit']}, {meta['date']}, load "
            f"{meta['load_avg_1m']:.1f}; median of {args.repeats} repeats."]
    md = "\n".join(head + lines) + "\n"
    (out / "speculative_sweep.md").write_text(md)
    print(md)
    return 0


def _sweep_table(sweep: list[dict]) -> list[str]:
    ts = list(sweep[0]["fwd_ms"])
    lines = ["", "Cost of a forward over T tokens vs one token, random-init models "
             "(batch 1, 160 cached tokens):", "",
             "| model | params | dtype | fwd(1) ms | " + " | ".join(
                 f"fwd({t})/fwd(1)" for t in ts[1:]) + " |",
             "|---|---|---|---|" + "---|" * (len(ts) - 1)]
    for r in sweep:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['dtype']} | "
                     f"{r['fwd_ms'][ts[0]]:.3f} | " + " | ".join(
                         f"{r['ratio'][t]:.2f}" for t in ts[1:]) + " |")
    return lines


def _f(x, spec):
    return "" if x is None else format(x, spec)


def render(report: dict) -> str:
    m = report["meta"]
    lines = [
        "# Speculative decoding vs plain greedy (target)", "",
        f"device {m['device_kind']} ({m['cpu_count']} cores, load {m['load_avg_1m']:.1f} at "
        f"the end), jax {m['jax']}, commit {m['commit']}, {m['date']}. Target "
        f"{report['target_params'] / 1e6:.2f}M params ({m['target_steps']} steps), draft "
        f"{report['draft_params'] / 1e6:.2f}M ({m['draft_steps']} steps), served in "
        f"{m['dtype']}; {m['prompts']} prompts of {m['prompt_len']} tokens, batch {m['batch']}, "
        f"{m['new_tokens']} new tokens; decode tokens/s (prefill excluded), median of "
        f"{m['repeats']} interleaved rounds.", "",
        "Speedup is over plain greedy of the served target; \"vs best greedy\" is over the "
        "faster of its float32 and served-dtype greedy.", "",
        "| method | tokens/s | speedup | vs best greedy | identical to greedy | accepted/forward "
        "| mean draft len | predicted (verify = 1 step) | predicted (measured costs) "
        "| acceptance per position |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        acc = r.get("acceptance_per_position")
        acc = " ".join("-" if a is None else f"{a:.2f}" for a in acc) if acc else ""
        lines.append(
            f"| {r['method']} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x | "
            f"{r['speedup_vs_best_plain_greedy']:.2f}x | "
            f"{_f(r['identical'], '')} | {_f(r.get('mean_accepted_per_forward'), '.2f')} | "
            f"{_f(r.get('mean_draft_length'), '.2f')} | "
            f"{_f(r.get('predicted_speedup_verify_1_step'), '.2f')} | "
            f"{_f(r.get('predicted_speedup_measured_costs'), '.2f')} | {acc} |")
    f1 = report["forward_ms"][1]
    lines += ["", "Measured target forward over T new tokens (batch 1; draft forward "
              f"{report['draft_forward_ms']:.3f} ms = {report['cost_ratio_draft']:.3f} of a "
              "target step):", "",
              "| T | " + " | ".join(str(t) for t in report["forward_ms"]) + " |",
              "|---|" + "---|" * len(report["forward_ms"]),
              "| ms | " + " | ".join(f"{v:.3f}" for v in report["forward_ms"].values()) + " |",
              "| / fwd(1) | " + " | ".join(f"{v / f1:.2f}" for v in report["forward_ms"].values())
              + " |"]
    if report["cost_sweep"]:
        lines += _sweep_table(report["cost_sweep"])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
