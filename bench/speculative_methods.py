"""Every speculative method side by side on one trained target, with transformers as the peer.

Run: ``.venv/bin/python bench/speculative_methods.py [--size 20m|small|smoke] [--draft
2.6m|0.16m] [--only all|drafts] [--modes greedy,sample] [--no-hf] [--train-only]``.

Models (trained by cadenza's ``fit`` when absent, cached under ``--runs``, default
``runs/spec_methods/<size>``; how long each took is recorded with the cache and in the
results): a target on the stdlib code corpus (``tiny_pretrain``; ``--size 20m`` is a
21.7M-parameter Llama, 6 layers, width 512; ``small`` 3.4M; ``smoke`` a minute-long check
of this script) and three drafts of the ``--draft`` shape (:data:`DRAFTS`; ``20m``: 2.6M
params, 3 layers of width 256; ``small`` and ``smoke``: the 0.16M ``tiny`` shape):
LM-pretrained on the corpus, distilled from the target (``train.task: distill``, forward
KL, started from the LM-pretrained draft) and distilled on-policy (the same on the target's
own sampled generations, ``train.distill.on_policy``); Medusa and Hydra heads
(``train.task`` medusa / hydra) and the SpecDec++ acceptance head of the distilled draft
(cached in that draft's run directory). ``--train-only`` stops once every model exists;
``--only drafts`` times plain decoding and the draft-model rows alone (no heads, no
layer-skip search; results file with a ``_drafts`` suffix).

Prompts: ``--prompts`` windows of ``--prompt-len`` tokens from held-out stdlib modules
(the corpus' test split, at least 4 modules, two windows per module), decoded one per
call, ``--new-tokens`` tokens each with EOS ignored; decode-only time (prefill excluded).
Every repeat runs every method once (interleaved); reported: the median tokens/s over
``--repeats`` repeats with min and max. Modes: greedy, and sampled at temperature 0.8
(the speculative methods with exact speculative sampling). Methods: plain decoding, the
three drafts at each ``--gammas``, the confidence rule and the SpecDec++ stop rule with
the distilled draft, prompt lookup, Medusa, Hydra, layer-skip (half the layers skipped,
the set searched on two calibration prompts of other held-out modules) and any other
speculative method of the registry (``cadenza.decode.registry``) with its default
settings (Token Recycling also with the 15-node tree of its earlier defaults). Columns: tokens/s,
speedup over plain decoding of the same mode, accepted tokens per target forward,
acceptance at draft position 1, identical to plain greedy (greedy rows) and predicted
speedup from measured costs (``accepted/forward / (draft length * c + h + fwd(T)/
fwd(1))``, c = a draft step over a target step (draft models; layer-skip: the target with
its skip set left out), h = Medusa's or Hydra's heads proposing one round over a target
step, T = tree nodes + 1, rounded up to a measured size; drafts that stop early are
verified only as far as the round's longest, so their fwd(T) is averaged over the rounds'
widths).

Peer (same weights, exported with ``cadenza.models.save_hf``, in the reference env
``.venv-ref``, interleaved repeats there): transformers' greedy, assisted generation with
the ``--hf-drafts`` as ``assistant_model`` and ``prompt_lookup_num_tokens``, greedy and sampled,
as speedup over its own plain decoding of the same mode.

Results: ``bench/results/<device>/speculative_methods[_<size>].{json,md}`` (stamped with
device, jax, commit, date and load).
"""

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import statistics
import subprocess
import tempfile
import time

import jax

from cadenza.config import load_config
from cadenza.decode import DecodeConfig, SamplingConfig, generate
from cadenza.decode.config import RecyclingConfig, SpeculativeConfig
from cadenza.decode.hydra import Hydra, hydra_draft_params
from cadenza.decode.layer_skip import draft_config, skip_params
from cadenza.decode.medusa import Medusa, load_tree_heads, save_tree_heads
from cadenza.decode.prompt_lookup import PromptLookup
from cadenza.decode.registry import REGISTRY, build
from cadenza.decode.specdec_head import StopRule, load_accept_head, save_accept_head
from cadenza.decode.speculative import DraftModel
from cadenza.models import Transformer, load_model, save_hf
from cadenza.models.checkpoint import tokenizer_dir
from cadenza.models.tokenizer import load_tokenizer
from cadenza.provenance import load_note, provenance, results_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
# draft shapes (``--draft``; params at the stdlib tokenizer's 512 tokens). "0.16m": the
# ``tiny`` preset's 2 layers of width 64, the drafts of the runs before 2026-12-06 (their
# cached models are reused with ``--draft 0.16m --distill-steps 200``). "2.6m": 3 layers of
# width 256, a draft step ~0.02-0.06 of a 21.76M target step on the 2-core CPU (measured with
# forward_ms below; the results file records it).
DRAFTS = {
    "0.16m": ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4",
              "model.num_kv_heads=2", "model.intermediate_size=192"],
    "2.6m": ["model.num_layers=3", "model.hidden_size=256", "model.num_heads=4",
             "model.num_kv_heads=2", "model.intermediate_size=768"],
}
SIZES = {
    "20m": {"target": ["model.hidden_size=512", "model.num_layers=6", "model.num_heads=8",
                       "model.num_kv_heads=4", "model.intermediate_size=1792"],
            "draft": "2.6m", "target_steps": 300, "draft_steps": 300, "distill_steps": 150,
            "head_steps": 200, "on_policy_prompts": 256},
    "small": {"target": ["model.hidden_size=256", "model.num_layers=4", "model.num_heads=8",
                         "model.num_kv_heads=4", "model.intermediate_size=768"],
              "draft": "0.16m", "target_steps": 100, "draft_steps": 100, "distill_steps": 60,
              "head_steps": 60, "on_policy_prompts": 64},
    "smoke": {"target": ["model.hidden_size=128", "model.num_layers=2", "model.num_heads=4",
                         "model.num_kv_heads=2", "model.intermediate_size=384"],
              "draft": "0.16m", "target_steps": 4, "draft_steps": 4, "distill_steps": 3,
              "head_steps": 3, "on_policy_prompts": 8},
}
# forward sizes whose cost is measured (a verify over T tokens uses the next one up)
COST_TOKENS = (1, 2, 3, 4, 5, 7, 10, 16)
# methods this script builds itself (other registered speculative methods run by default)
OWN = {"greedy", "sample", "speculative", "ngram", "medusa", "hydra", "superposed", "lud"}
HF_RUNNER = r"""
import json, statistics, sys, time
import torch
from transformers import AutoModelForCausalLM
spec = json.loads(sys.argv[1])
torch.manual_seed(0)
load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                      local_files_only=True).eval()
target = load(spec["target"])
drafts = {k: load(v) for k, v in spec["drafts"].items()}
n = spec["new_tokens"]
rows = {}
for mode in ("greedy", "sample"):
    kw = dict(max_new_tokens=n, min_new_tokens=n, pad_token_id=0, do_sample=mode == "sample")
    if mode == "sample":
        kw.update(temperature=0.8, top_k=0, top_p=1.0)
    rows[f"plain {mode}"] = {}
    for k in drafts:
        rows[f"assisted ({k} draft) {mode}"] = {"assistant_model": drafts[k]}
    rows[f"prompt lookup (10 tokens) {mode}"] = {"prompt_lookup_num_tokens": 10}
    spec.setdefault("modes", {})[mode] = kw
names = list(rows)
times = {k: [] for k in names}
tokens = {k: [] for k in names}
with torch.inference_mode():
    for r in range(spec["repeats"] + 1):          # the first round warms up
        for name in names:
            mode = name.rsplit(" ", 1)[1]
            total, out = 0.0, []
            for p in spec["prompts"]:
                ids = torch.tensor([p])
                t0 = time.perf_counter(); target(ids, use_cache=True)
                prefill = time.perf_counter() - t0
                t0 = time.perf_counter()
                gen = target.generate(ids, **spec["modes"][mode], **rows[name])
                total += max(time.perf_counter() - t0 - prefill, 1e-9)
                out.append(gen[0, len(p):].tolist())
            if r:
                times[name].append(len(spec["prompts"]) * (n - 1) / total)
            tokens[name] = out
print(json.dumps({"tokens_per_s": times, "tokens": tokens,
                  "threads": torch.get_num_threads()}))
"""


def _key(overrides: list[str]) -> str:
    return hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:8]


def trained(runs: pathlib.Path, name: str, experiment: str, overrides: list[str],
            steps: int, timings: dict) -> pathlib.Path:
    """The model directory of ``experiment`` with ``overrides`` trained ``steps`` steps with
    ``fit`` (``<runs>/<name>-<steps>-<hash>/model``), trained now if absent; the training
    seconds go to ``timings[name]`` (read back from ``train_s.json`` when cached)."""
    out = runs / f"{name}-{steps}-{_key(overrides)}"
    model_dir, record = out / "model", out / "train_s.json"
    if not (model_dir / "config.yaml").exists():
        from cadenza.train.trainer import fit

        config = load_config(experiment, overrides + [
            f"train.output_dir={out}", f"train.steps={steps}", "train.eval_every=0",
            f"train.checkpoint_every={steps}", f"train.log_every={max(steps // 4, 1)}",
            "train.progress_bar=false", "train.tensorboard=false"])
        t0 = time.perf_counter()
        summary = fit(config)
        seconds = time.perf_counter() - t0
        record.write_text(json.dumps({"seconds": seconds, "loss": summary["loss"],
                                      "load_avg_1m": os.getloadavg()[0]}))
        print(f"trained {name} in {seconds:.0f} s: loss {summary['loss']:.3f}", flush=True)
    timings[name] = json.loads(record.read_text()) if record.exists() else None
    return model_dir


def trained_heads(runs, drafter, target, tparams, tcfg, steps, timings):
    """Medusa or Hydra heads of ``drafter`` on the target (cached head directory)."""
    from cadenza.train.data import build_iterator
    from cadenza.train.medusa_task import train_tree_heads

    d = runs / f"{drafter.kind}-heads-{steps}"
    if not d.exists():
        t0 = time.perf_counter()
        batches = (b["inputs"] for b in build_iterator(tcfg))
        heads, losses = train_tree_heads(target, tparams, batches, drafter, steps=steps,
                                         learning_rate=3e-3)
        save_tree_heads(d, drafter, target.config, heads)
        (d.parent / f"{d.name}.json").write_text(json.dumps(
            {"seconds": time.perf_counter() - t0, "loss": losses[-1]}))
    timings[f"{drafter.kind} heads"] = json.loads((d.parent / f"{d.name}.json").read_text())
    return load_tree_heads(d, target.config, type(drafter))


def trained_accept_head(d, target, tparams, draft, dparams, tcfg, steps, timings):
    """The SpecDec++ acceptance head of the distilled draft (cached head directory ``d``,
    trained ``steps`` steps when absent; by default ``accept-head-<steps>`` in the draft's
    own run directory)."""
    from cadenza.train.data import build_iterator
    from cadenza.train.specdec_task import train_accept_head

    if not d.exists():
        t0 = time.perf_counter()
        batches = (b["inputs"] for b in build_iterator(tcfg))
        head, losses = train_accept_head(target, tparams, draft, dparams, batches, steps=steps,
                                         learning_rate=3e-3)
        save_accept_head(d, head, draft.config.hidden_size)
        (d.parent / f"{d.name}.json").write_text(json.dumps(
            {"seconds": time.perf_counter() - t0, "loss": losses[-1]}))
    timings["specdec++ head"] = json.loads((d.parent / f"{d.name}.json").read_text())
    return load_accept_head(d, draft.config)


def heldout_prompts(tokenizer, heldout_fraction: float, n: int, length: int):
    """``n`` prompts of ``length`` tokens: two windows (at 1/3 and 2/3) of each of the
    first ``n // 2`` held-out stdlib modules long enough; returns (prompts, modules)."""
    from cadenza.train.data import stdlib

    root, out, modules = stdlib.stdlib_root(), [], []
    for rel in stdlib.stdlib_files():
        if len(out) >= n or not stdlib.is_heldout(rel, heldout_fraction) or "test" in str(rel):
            continue
        ids = tokenizer.encode((root / rel).read_text(errors="replace"), add_bos=False)
        if len(ids) < 4 * length:
            continue
        for frac in (1, 2):
            start = len(ids) * frac // 3
            out.append([tokenizer.bos_id] + ids[start:start + length - 1])
        modules.append(str(rel))
    return out[:n], modules


def forward_ms(model, params, tokens: int, prefix: int, repeats: int) -> float:
    """Median ms of one cached forward over ``tokens`` tokens after ``prefix`` (batch 1), in
    the layout decoding uses (:func:`cadenza.models.decode_layout`: on CPU a scanned model's
    per-step weight-slice copies would add a constant to every size and flatten the ratios)."""
    import jax.numpy as jnp

    from cadenza.decode.verify import verify
    from cadenza.models import KVCache, decode_layout

    model, params = decode_layout(model, params)

    def run(params, cache):
        def body(i, carry):
            cache, acc = carry
            logits, _, cache = verify(model, params, cache.with_lengths(prefix),
                                      jnp.full((1, tokens), i % 7, jnp.int32))
            return cache, acc + logits[0, -1, 0]
        return jax.lax.fori_loop(0, 20, body, (cache, jnp.float32(0)))[1]

    fn = jax.jit(run)
    cache = KVCache.create(model.config, 1, prefix + tokens + 1)
    jax.block_until_ready(fn(params, cache))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, cache))
        times.append((time.perf_counter() - t0) / 20 * 1e3)
    return statistics.median(times)


def run_peer(target_dir, drafts: dict, prompts, new_tokens: int, repeats: int) -> dict:
    """transformers (reference env) on the same weights: tokens/s per method and mode."""
    python = ROOT / ".venv-ref" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} missing: run `make ref-env`, or pass --no-hf")
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"target": str(save_hf(target_dir, pathlib.Path(tmp) / "target")),
                "drafts": {k: str(save_hf(d, pathlib.Path(tmp) / k)) for k, d in drafts.items()},
                "prompts": prompts, "new_tokens": new_tokens, "repeats": repeats}
        proc = subprocess.run([str(python), "-c", HF_RUNNER, json.dumps(spec)],
                              capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"transformers runner failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


@dataclasses.dataclass
class Row:
    """One contender: ``config`` for :func:`generate` and its in-memory ``resources``."""

    name: str
    mode: str
    config: DecodeConfig
    resources: dict
    draft_step_cost: float = 0.0      # a draft step / a target step (per drafted token)
    round_cost: float = 0.0           # drafting per round / a target step (tree heads)
    tps: list = dataclasses.field(default_factory=list)
    result: dict | None = None


def build_rows(args, target, tparams, drafts, heads, accept, skip, new_tokens):
    """Every contender in each of ``args.modes`` (``skip``: layer-skip's skipped layers and
    its draft step cost; ``heads``: ``((drafter, params, round cost), ...)`` for Medusa and
    Hydra, or None: plain decoding and the draft-model rows only)."""
    rows = []
    for mode in args.modes:
        sample = mode == "sample"
        base = DecodeConfig(max_new_tokens=new_tokens, ignore_eos=True, seed=0,
                            sampling=SamplingConfig(temperature=0.8 if sample else 1.0))

        def spec_cfg(method, **fields):
            return dataclasses.replace(base, method=method, speculative=SpeculativeConfig(
                sample=sample, **fields))

        rows.append(Row(f"plain {mode}", mode, dataclasses.replace(base, method=mode), {}))
        for dname, (dcfg, dparams, cost) in drafts.items():
            for g in args.gammas:
                rows.append(Row(f"draft model ({dname}) gamma={g}", mode,
                                spec_cfg("speculative", gamma=g),
                                {"drafter": DraftModel(dcfg, g), "draft_params": (dparams, None)},
                                cost))
        dcfg, dparams, cost = drafts["distilled"]
        rows.append(Row(f"adaptive confidence (distilled, max {args.max_gamma})", mode,
                        spec_cfg("speculative", gamma=args.max_gamma),
                        {"drafter": DraftModel(dcfg, args.max_gamma, stop=StopRule("confidence"),
                                               name="adaptive-confidence"),
                         "draft_params": (dparams, None)}, cost))
        if heads is None:            # --only drafts
            continue
        head, blocks = accept
        rows.append(Row(f"SpecDec++ stop rule (distilled, max {args.max_gamma})", mode,
                        spec_cfg("speculative", gamma=args.max_gamma),
                        {"drafter": DraftModel(dcfg, args.max_gamma,
                                               stop=StopRule("head", blocks=blocks),
                                               name="specdec++"),
                         "draft_params": (dparams, head)}, cost))
        for g in args.ngram_gammas:
            rows.append(Row(f"prompt lookup gamma={g}", mode, spec_cfg("ngram", gamma=g),
                            {"drafter": PromptLookup(gamma=g), "draft_params": None}))
        for label, (drafter, dparams, cost) in zip(("Medusa", "Hydra"), heads):
            rows.append(Row(f"{label} ({len(drafter.paths)}-node tree)", mode,
                            spec_cfg(drafter.kind), {"drafter": drafter,
                                                     "draft_params": dparams},
                            round_cost=cost))
        for name, entry in REGISTRY.items():       # other registered speculative methods
            if name in OWN or entry.section is None or "--sample" not in entry.flags:
                continue
            cfg = spec_cfg(name, gamma=args.max_gamma)
            label = f"{name} (defaults)"
            step_cost = 0.0
            if name == "layer_skip":                # the searched skip set
                skipped, step_cost = skip
                cfg = dataclasses.replace(cfg, layer_skip=dataclasses.replace(
                    cfg.layer_skip, skip_layers=list(skipped)))
                label = f"layer_skip (skip {list(skipped)}, max {args.max_gamma})"
            rows.append(Row(label, mode, cfg, {}, step_cost))
            if name == "recycling":                 # the wider tree the defaults replaced
                rows.append(Row("recycling (15 nodes, depth 4)", mode, dataclasses.replace(
                    cfg, recycling=RecyclingConfig(nodes=15, depth=4)), {}))
    return rows


def searched_skip(target, tparams, calibration, args, fwd1_ms) -> tuple:
    """Layer-skip's skip set: half the target's layers, searched greedily for the most
    accepted tokens per forward on the calibration prompts (not the benchmark's); returns
    (skipped layers, the skipping draft's step over ``fwd1_ms``, a target step measured
    with :func:`forward_ms`, as the draft's step is)."""
    from cadenza.decode.layer_skip import search_skip_set

    cfg = DecodeConfig(method="layer_skip", max_new_tokens=32, ignore_eos=True,
                       speculative=SpeculativeConfig(gamma=args.max_gamma))
    skip, trials = search_skip_set(target, tparams, calibration, cfg,
                                   target.config.num_layers // 2)
    print(f"layer-skip search: skip {list(skip)} ({len(trials)} trials)", flush=True)
    prefix = args.prompt_len + args.new_tokens // 2
    sub = skip_params(target.config, tparams, skip)
    draft = Transformer(draft_config(target.config, len(sub.kept)))
    return skip, forward_ms(draft, sub.params, 1, prefix, args.repeats) / fwd1_ms


def tree_head_cost(target, tparams, drafter, heads, prompt, args, fwd1_ms) -> tuple:
    """``(drafter, draft params, round cost)`` for Medusa or Hydra ``heads``: the heads'
    proposal per round (:func:`spec_tree_parts.draft_alone_ms`) over ``fwd1_ms``, a target
    step measured with :func:`forward_ms` (both loop 20 calls in one program)."""
    from spec_tree_parts import draft_alone_ms  # it imports this module (via spec_round_cost)

    dparams = hydra_draft_params(heads, tparams) if drafter.kind == "hydra" else heads
    base = DecodeConfig(method=drafter.kind, max_new_tokens=args.new_tokens, ignore_eos=True,
                        seed=0)
    method, params = build(target, tparams, base, drafter=drafter, draft_params=dparams)
    ms = draft_alone_ms(method, params, prompt, base, 20, args.repeats)
    return drafter, dparams, ms / fwd1_ms


def decode(target, tparams, row: Row, prompts):
    """All prompts one per call: (token ids, decode seconds, tokens, per-call stats)."""
    ids, secs, decoded, stats = [], 0.0, 0, []
    for i, p in enumerate(prompts):
        res = generate(target, tparams, [p], row.config, seeds=[i], **row.resources)
        ids += res.token_ids
        secs += res.stats["decode_s"]
        decoded += len(res.token_ids[0]) - 1          # the first token comes from prefill
        stats.append(res.stats)
    return ids, secs, decoded, stats


def summarise(row: Row, out, costs, plain_ids, base_tps) -> dict:
    ids, _, decoded, stats = out
    med = statistics.median(row.tps)
    r = {"method": row.name, "mode": row.mode, "tokens_per_s": med,
         "tokens_per_s_min": min(row.tps), "tokens_per_s_max": max(row.tps),
         "tokens_per_s_repeats": row.tps, "speedup": med / base_tps,
         "identical_to_greedy": (ids == plain_ids) if row.mode == "greedy" else None}
    if "target_forwards" not in stats[0]:
        return r
    forwards = sum(s["target_forwards"] for s in stats)
    drafted = sum(s["mean_draft_length"] * s["target_forwards"] for s in stats)
    first = [s["acceptance_per_position"][0] for s in stats
             if s["acceptance_per_position"] and s["acceptance_per_position"][0] is not None]
    per_forward, mean_draft = decoded / forwards, drafted / forwards
    drafter = row.resources.get("drafter")
    nodes = len(drafter.parents) if drafter is not None else int(stats[0].get("gamma", 1))
    widths = collections.Counter()          # rounds by tokens verified (drafts may vary)
    for s in stats:
        widths.update({int(w): k for w, k in s.get(
            "verify_widths", {nodes + 1: s["target_forwards"]}).items()})
    rounds = sum(widths.values())

    def cost(w):                            # fwd(w) / fwd(1), at the next measured size up
        return costs[min([k for k in costs if k >= w] or [max(costs)])] / costs[1]

    verify_cost = sum(k * cost(w) for w, k in widths.items()) / rounds
    r.update({"accepted_per_forward": per_forward, "mean_draft_length": mean_draft,
              "acceptance_position_1": statistics.mean(first) if first else None,
              "verify_tokens": sum(w * k for w, k in widths.items()) / rounds,
              "predicted_speedup": per_forward / (mean_draft * row.draft_step_cost
                                                  + row.round_cost + verify_cost)})
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="20m", choices=list(SIZES))
    p.add_argument("--draft", choices=list(DRAFTS), help="draft shape; default: the size's")
    for k in ("target_steps", "draft_steps", "distill_steps", "head_steps",
              "on_policy_prompts"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int, help="default: the size's")
    p.add_argument("--train-only", action="store_true",
                   help="train (or find cached) every model, then stop")
    p.add_argument("--runs", default="runs/spec_methods", help="trained models (cached)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--gammas", default="2,4")
    p.add_argument("--max-gamma", type=int, default=6)
    p.add_argument("--ngram-gammas", default="4")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--modes", default="greedy,sample")
    p.add_argument("--only", choices=["all", "drafts"], default="all",
                   help="drafts: plain decoding and the draft-model rows only (fixed gammas "
                        "and the confidence stop rule; no heads trained), written with a "
                        "_drafts suffix")
    p.add_argument("--accept-head", help="the SpecDec++ head directory of the distilled "
                   "draft (trained there when absent; default: accept-head-<head steps> in "
                   "the draft's run directory), e.g. to keep a read-only --runs untouched")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    p.add_argument("--hf-drafts", default="distilled",
                   help="drafts given to transformers as assistant_model (comma-separated: "
                        "LM-pretrained, distilled, on-policy)")
    p.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = p.parse_args()
    size = {**SIZES[args.size], **{k: v for k, v in vars(args).items()
                                   if k in SIZES[args.size] and v is not None}}
    args.gammas = [int(g) for g in args.gammas.split(",") if g]
    args.ngram_gammas = [int(g) for g in args.ngram_gammas.split(",") if g]
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.modes or set(args.modes) - {"greedy", "sample"}:
        p.error(f"--modes {','.join(args.modes)}: use greedy, sample or greedy,sample")
    runs, timings = pathlib.Path(args.runs) / args.size, {}
    load_start = os.getloadavg()[0]

    tdir = trained(runs, "target", "tiny_pretrain", size["target"], size["target_steps"],
                   timings)
    draft = DRAFTS[size["draft"]]
    lm_dir = trained(runs, "draft-lm", "tiny_pretrain", draft, size["draft_steps"], timings)
    distill = draft + [f"train.init_from={tdir.absolute()}",
                       f"train.distill.student={lm_dir.absolute()}"]
    kd_dir = trained(runs, "draft-distilled", "tiny_distill", distill, size["distill_steps"],
                     timings)
    op_dir = trained(runs, "draft-on-policy", "tiny_distill", distill + [
        "train.distill.on_policy=true", f"train.distill.prompts={size['on_policy_prompts']}"],
        size["distill_steps"], timings)
    tcfg, tparams = load_model(tdir)
    target = Transformer(tcfg.model)
    tok = load_tokenizer(tokenizer_dir(tdir))
    prompts, modules = heldout_prompts(tok, tcfg.data.heldout_fraction, args.prompts + 2,
                                       args.prompt_len)
    prompts, calibration, modules = prompts[:args.prompts], prompts[args.prompts:], modules[
        :(args.prompts + 1) // 2]
    heads = accept = None
    if args.only == "all":
        heads = [trained_heads(runs, kind(), target, tparams, tcfg, size["head_steps"], timings)
                 for kind in (Medusa, Hydra)]
        kd_cfg, kd_params = load_model(kd_dir)
        head_dir = (pathlib.Path(args.accept_head) if args.accept_head else
                    runs / kd_dir.parent.name / f"accept-head-{size['head_steps']}")
        accept = trained_accept_head(head_dir, target, tparams, Transformer(kd_cfg.model),
                                     kd_params, tcfg, size["head_steps"], timings)
    if args.train_only:
        print(json.dumps(timings, indent=1))
        return
    prefix = args.prompt_len + args.new_tokens // 2
    costs = {t: forward_ms(target, tparams, t, prefix, args.repeats) for t in COST_TOKENS}
    drafts = {}
    for name, d in (("LM-pretrained", lm_dir), ("distilled", kd_dir), ("on-policy", op_dir)):
        dcfg, dparams = load_model(d)
        drafts[name] = (dcfg.model, dparams,
                        forward_ms(Transformer(dcfg.model), dparams, 1, prefix, args.repeats)
                        / costs[1])
    skip = (searched_skip(target, tparams, calibration, args, costs[1])
            if "layer_skip" in REGISTRY and args.only == "all" else ((), 0.0))
    if heads is not None:
        heads = [tree_head_cost(target, tparams, d, p, prompts[0], args, costs[1])
                 for d, p in heads]
    rows = build_rows(args, target, tparams, drafts, heads, accept, skip, args.new_tokens)

    peer = None
    if not args.no_hf:                                  # first: a failure shows early
        dirs = {"LM-pretrained": lm_dir, "distilled": kd_dir, "on-policy": op_dir}
        peer = run_peer(tdir, {k: dirs[k] for k in args.hf_drafts.split(",") if k},
                        prompts, args.new_tokens, args.repeats)
        print("transformers peer done", flush=True)
    outputs = {}
    t0 = time.perf_counter()
    for row in rows:                                    # warm-up: compiles every program
        outputs[row.name, row.mode] = decode(target, tparams, row, prompts)
    compile_s = time.perf_counter() - t0
    for r in range(args.repeats):
        for row in rows:
            _, secs, decoded, _ = decode(target, tparams, row, prompts)
            row.tps.append(decoded / secs)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{row.name} {row.mode} {row.tps[-1]:.0f}" for row in rows), flush=True)
    plain_ids = outputs.get(("plain greedy", "greedy"), (None,))[0]
    results = []
    for row in rows:
        base = next(x for x in rows if x.name == f"plain {row.mode}")
        results.append(summarise(row, outputs[row.name, row.mode], costs, plain_ids,
                                 statistics.median(base.tps)))
    report = {"meta": {"benchmark": "speculative_methods", **provenance(),
                       "load_avg_1m_start": load_start, "size": args.size, **size,
                       **{k: v for k, v in vars(args).items()
                          if k != "out" and v is not None}},
              "target_params": tcfg.model.num_params(),
              "draft_params": drafts["distilled"][0].num_params(),
              "prompt_modules": modules, "train_seconds": timings,
              "warmup_compile_s": compile_s, "forward_ms": costs,
              "draft_step_cost": {k: v[2] for k, v in drafts.items()},
              "head_round_cost": {d.kind: c for d, _, c in heads or ()},
              "layer_skip_step_cost": skip[1] if skip[0] else None,
              "rows": results, "peer": peer_rows(peer, plain_ids)}
    out = results_dir(__file__, args.out)
    stem = ("speculative_methods" + ("" if args.size == "20m" else f"_{args.size}")
            + ("" if args.only == "all" else f"_{args.only}"))
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    (out / f"{stem}.md").write_text(render(report))
    print(render(report))


def peer_rows(peer, plain_ids) -> list[dict]:
    """transformers' rows: median tokens/s with min/max and speedup over its own plain
    decoding of the same mode; greedy rows: identical to its own and to cadenza's greedy."""
    if peer is None:
        return []
    rows = []
    for name, tps in peer["tokens_per_s"].items():
        mode = name.rsplit(" ", 1)[1]
        base = statistics.median(peer["tokens_per_s"][f"plain {mode}"])
        row = {"method": name, "mode": mode, "tokens_per_s": statistics.median(tps),
               "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps),
               "speedup": statistics.median(tps) / base}
        if mode == "greedy":
            # cadenza's token lists start with the prefill's token, as transformers' do
            row["identical_to_own_greedy"] = (peer["tokens"][name]
                                              == peer["tokens"]["plain greedy"])
            row["identical_to_cadenza_greedy"] = peer["tokens"][name] == plain_ids
        rows.append(row)
    return rows


def _f(x, spec):
    return "" if x is None else format(x, spec)


def render(report: dict) -> str:
    m = report["meta"]
    t = report["train_seconds"]
    trained = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in t.items() if v)
    lines = [
        "# Speculative methods side by side (issue 19 benchmark)", "",
        f"device {m['device_kind']} ({m['cpu_count']} cores), jax {m['jax']}, commit "
        f"{m['commit']}, {m['date']}; {load_note(m)}. "
        f"Size `{m['size']}`: target {report['target_params'] / 1e6:.2f}M params "
        f"({m['target_steps']} steps), drafts {report['draft_params'] / 1e6:.2f}M "
        f"(`--draft {m.get('draft', '0.16m')}`; LM-pretrained {m['draft_steps']} steps; "
        "distilled and on-policy: "
        f"+{m['distill_steps']} distillation steps)"
        + (f", heads {m['head_steps']} steps" if m.get("only", "all") == "all" else
           ", no heads (`--only drafts`)")
        + f"; float32. {len(report['prompt_modules'])} held-out modules "
        f"({', '.join(report['prompt_modules'])}), {m['prompts']} prompts of "
        f"{m['prompt_len']} tokens, one per call, {m['new_tokens']} new tokens, EOS ignored; "
        f"decode tokens/s (prefill excluded), median of {m['repeats']} interleaved repeats "
        "[min-max].", "",
        f"Training time (cached runs keep their first time): {trained}.", "",
        "Speedup is over plain decoding of the same mode (greedy or temperature 0.8); "
        "predicted = accepted/forward / (draft length x draft step cost + heads per round "
        "+ fwd(T)/fwd(1)) from the costs measured below, T the tokens verified per round (drafts "
        "that stop early are verified only as far as the round's longest: fwd(T) "
        "averaged over the rounds).", "",
        "| mode | method | tokens/s [min-max] | speedup | accepted/forward | acceptance at "
        "position 1 | identical to greedy | predicted speedup |",
        "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(
            f"| {r['mode']} | {r['method']} | {r['tokens_per_s']:.0f} "
            f"[{r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f}] | "
            f"{r['speedup']:.2f}x | {_f(r.get('accepted_per_forward'), '.2f')} | "
            f"{_f(r.get('acceptance_position_1'), '.2f')} | "
            f"{_f(r['identical_to_greedy'], '')} | {_f(r.get('predicted_speedup'), '.2f')} |")
    if report["peer"]:
        lines += ["", "transformers (reference env, same weights, CPU), speedup over its own "
                  "plain decoding of the same mode:", "",
                  "| mode | method | tokens/s [min-max] | speedup | identical to its greedy |",
                  "|---|---|---|---|---|"]
        for r in report["peer"]:
            lines.append(f"| {r['mode']} | {r['method']} | {r['tokens_per_s']:.0f} "
                         f"[{r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f}] | "
                         f"{r['speedup']:.2f}x | {_f(r.get('identical_to_own_greedy'), '')} |")
    f = report["forward_ms"]
    steps = {**report["draft_step_cost"]}
    if report.get("layer_skip_step_cost") is not None:
        steps["layer-skip"] = report["layer_skip_step_cost"]
    heads = report.get("head_round_cost") or {}
    lines += ["", "Target forward over T tokens (batch 1, cached prefix; draft step costs: "
              + ", ".join(f"{k} {v:.3f}" for k, v in steps.items()) + " of a target step"
              + "".join(f"; {k} heads {v:.3f} of a target step per round"
                        for k, v in heads.items()) + "):", "",
              "| T | " + " | ".join(str(k) for k in f) + " |", "|---|" + "---|" * len(f),
              "| fwd(T)/fwd(1) | " + " | ".join(f"{v / f[1]:.2f}" for v in f.values()) + " |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
