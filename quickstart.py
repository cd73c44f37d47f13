"""``cadenza quickstart``: the main job end to end, on whatever device JAX finds.

Nothing is downloaded: the interpreter's standard library is the corpus.

1. **Data**: the stdlib code corpus (``stdlib_code``) and docstring -> body
   instruction pairs (``stdlib_instruct``) are built as TFDS datasets, and a
   byte-level BPE tokenizer is trained on the code (``cadenza.train.data``); the
   unigram cross-entropy of each is the baseline printed beside every loss.
2. **Pretraining**: a small target model and a much smaller draft model are
   trained on the code corpus with :func:`cadenza.train.fit` for several passes over
   it; each module is cut into ``seq_len`` pieces (``data.truncation=chunk``, pieces
   shuffled in windows of :data:`PRETRAIN_SHUFFLE_WINDOW`), held-out modules are
   evaluated as it trains.
3. **Instruction tuning**: the target is LoRA-tuned on the instruction pairs; the
   held-out (per-module split) loss and a measured task (:mod:`cadenza.quickstart_eval`:
   first-line exact match and syntax pass@k of held-out function bodies) are reported
   before and after, with sample completions. The draft model is distilled from the
   tuned target (``train.task=distill``: it starts from the LM-pretrained draft and learns
   the target's next-token distributions on the instruction pairs, forward KL), Medusa
   heads are trained on the tuned target, and a copy of it is LUD-fine-tuned with one
   extra vocabulary row (the placeholder id, :func:`cadenza.models.vocab.extend_vocab`).
4. **Decoding**: held-out docstrings from several modules are completed with every
   decoding method of the build (:data:`cadenza.quickstart_methods.DECODE_METHODS`),
   timed interleaved over repeats (medians with the spread); a table reports tokens/s
   end to end and decode-only, speedup over greedy, accepted tokens per target forward
   and whether the greedy-equivalent methods reproduced greedy exactly.

A stage whose library is not part of this build is reported as "not available in this
build" (never a made-up number).

Rerunning into the same ``out_dir`` is safe: each finished stage records its result
under ``stages/`` (written atomically) and is reused; an interrupted training stage
resumes from its checkpoint. Delete ``stages/<name>.json`` to redo a stage.

Everything lands under ``out_dir``: ``data/`` (datasets, tokenizer), ``target/``,
``draft/``, ``sft/``, ``distill/``, ``medusa/``, ``lud/`` (each a ``fit`` output: checkpoints,
``tensorboard/``, ``metrics.jsonl``, ``model/`` or ``adapters/``), ``ngram/`` (the
n-gram table), ``stages/``, ``results.json``, ``results.md`` and ``results.png``.
"""

import hashlib
import json
import pathlib
import time
from collections.abc import Callable

from cadenza.outputs import atomic_file
from cadenza.provenance import provenance
from cadenza.quickstart_eval import (
    heldout_loss,
    measure_task,
    task_examples,
    unigram_cross_entropy,
)
from cadenza.quickstart_methods import (
    DECODE_METHODS,
    Context,
    Unavailable,
    have,
    time_methods,
)
from cadenza.quickstart_report import render_markdown, write_results

# Sizes: {name: settings}. "fast" is for CI smoke tests; "default" fits in 10 minutes on
# two CPU cores; "large" is for an accelerator. ``prompts`` held-out prompts are timed
# ``repeats`` times per method; ``task_examples`` held-out functions (bodies of at most
# ``max_body_tokens`` tokens, so a completion can finish them) are scored with
# ``task_samples`` sampled bodies each.
SIZES: dict[str, dict] = {
    "fast": dict(
        target=dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                    intermediate_size=128),
        draft=dict(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1,
                   intermediate_size=64),
        vocab_size=384, seq_len=192, batch_size=8, target_steps=6, draft_steps=4,
        lora_steps=4, distill_steps=3, medusa_steps=3, lud_steps=3, lud_tokens=4000, eval_every=3,
        eval_steps=2, prompts=2,
        repeats=2, new_tokens=8, lora_rank=4, task_examples=2, task_samples=2,
        max_body_tokens=10_000,
        modules=["textwrap.py", "bisect.py", "heapq.py", "fnmatch.py", "shlex.py", "glob.py",
                 "string/__init__.py", "sched.py", "secrets.py"]),
    "default": dict(
        target=dict(num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2,
                    intermediate_size=384),
        draft=dict(num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=1,
                   intermediate_size=192),
        vocab_size=512, seq_len=128, batch_size=8, target_steps=1500, draft_steps=800,
        lora_steps=150, distill_steps=300, medusa_steps=150, lud_steps=300, lud_tokens=150_000,
        eval_every=250,
        eval_steps=4, prompts=8, repeats=5, new_tokens=128, lora_rank=8, task_examples=16,
        task_samples=5, max_body_tokens=120,
        modules=["json/", "textwrap.py", "string/__init__.py", "collections/", "functools.py",
                 "heapq.py", "bisect.py", "fnmatch.py", "shlex.py", "glob.py", "argparse.py",
                 "dataclasses.py", "enum.py", "pathlib.py", "csv.py", "base64.py", "difflib.py",
                 "statistics.py", "fractions.py", "random.py", "calendar.py", "html/",
                 "email/", "urllib/", "logging/", "configparser.py", "pprint.py", "inspect.py",
                 "ast.py", "tokenize.py"]),
    "large": dict(
        target=dict(num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=4,
                    intermediate_size=1536),
        draft=dict(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2,
                   intermediate_size=384),
        vocab_size=2048, seq_len=512, batch_size=16, target_steps=4000, draft_steps=2000,
        lora_steps=300, distill_steps=1000, medusa_steps=300, lud_steps=600, lud_tokens=1_000_000,
        eval_every=500, eval_steps=16, prompts=16, repeats=5, new_tokens=128, lora_rank=16,
        task_examples=64, task_samples=10, max_body_tokens=120, modules=None),
}

# Pieces shuffled together when pretraining on chunked modules: ~40 modules' worth at
# seq_len 128 (filling it tokenizes them, ~7 s on two CPU cores).
PRETRAIN_SHUFFLE_WINDOW = 4096
# Held-out functions taken per module, so prompts come from several modules.
PER_MODULE = 3
# LUD's acceptance threshold beta is chosen after its fine-tune: the largest of LUD_BETAS
# whose greedy LUD decode of the spare held-out prompts (task examples that are not timed)
# makes at least LUD_MIN_TOKENS_PER_CALL tokens per model call, else the one with the most.
# At this model size the placeholder's top probability rarely reaches the paper's 0.9.
LUD_BETAS = (0.9, 0.8, 0.7, 0.6, 0.5)
LUD_MIN_TOKENS_PER_CALL = 1.1


# --- configs and stages ----------------------------------------------------------------------

def _overrides(model: dict, prefix: str = "model") -> list[str]:
    return [f"{prefix}.{k}={v}" for k, v in model.items()]


def experiment(name: str, out_dir: pathlib.Path, size: dict, model: dict, *, fmt: str,
               steps: int, extra: list[str] = ()):
    """The ExperimentConfig of one quickstart training run (tiny preset + ``model`` fields)."""
    from cadenza.config import load_config

    modules = size["modules"]
    overrides = [
        f"name={name}", f"train.output_dir={out_dir / name}", f"train.steps={steps}",
        f"train.batch_size={size['batch_size']}", f"train.seq_len={size['seq_len']}",
        "train.learning_rate=3e-3", f"train.warmup_steps={max(1, steps // 10)}",
        f"train.log_every={max(1, min(25, steps // 20))}", f"train.checkpoint_every={steps}",
        "train.keep_checkpoints=1", f"train.eval_steps={size['eval_steps']}", "mesh.data=-1",
        f"model.vocab_size={size['vocab_size']}", f"data.format={fmt}",
        f"data.data_dir={out_dir / 'data'}", "data.heldout_fraction=0.1",
        *_overrides(model), *extra]
    if modules is not None:
        overrides.append("data.stdlib_modules=[" + ",".join(modules) + "]")
    return load_config(None, overrides, preset="tiny")


class Stages:
    """Finished stages of one quickstart folder: ``stages/<name>.json`` holds a stage's
    result and the fingerprint of the settings it ran with; a stage with a matching
    record is reused instead of run again. Records are written atomically, after the
    stage's own outputs."""

    def __init__(self, out: pathlib.Path, size: dict):
        self.dir = out / "stages"
        self.fingerprint = hashlib.sha256(
            json.dumps(size, sort_keys=True).encode()).hexdigest()[:16]

    def run(self, name: str, fn: Callable[[], dict]) -> dict:
        """``fn()``'s result, from the record of an earlier run when there is one."""
        path = self.dir / f"{name}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("fingerprint") == self.fingerprint:
                _log(f"{name}: reusing the finished stage ({path})")
                return record["result"]
            _log(f"{name}: settings changed since {path} was written; running it again")
        result = fn()
        with atomic_file(path, overwrite=True) as tmp:
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "result": result},
                                      default=str))
        return result


def _fit_summary(cfg) -> dict:
    """Train ``cfg`` with :func:`cadenza.train.fit` (resuming from its checkpoint if any) and
    keep what the report needs."""
    from cadenza.train import fit

    summary = fit(cfg)
    keys = ("step", "loss", "eval_loss", "tokens_per_s", "compile_s", "model_dir",
            "adapters_dir")
    return {"params": cfg.model.num_params(), **{k: summary[k] for k in keys}}


def _lud_model(out: pathlib.Path, size: dict, sft_cfg, tuned_params, tokenizer, code_files,
               tune_prompts: list[list[int]]):
    """LUD-fine-tune a copy of the tuned target with one extra vocabulary row as the
    placeholder id, on the code corpus's tokens, then choose beta on ``tune_prompts``
    (:func:`choose_lud_beta`); returns fit's summary with ``beta`` and ``beta_sweep``."""
    import numpy as np

    from cadenza.models import Transformer
    from cadenza.models.vocab import extend_vocab
    from cadenza.train.lud_task import finetune_lud

    vocab = sft_cfg.model.vocab_size
    base = experiment("lud", out, size, size["target"], fmt="stdlib_code",
                      steps=size["lud_steps"], extra=[
                          "train.progress_bar=false", "train.learning_rate=1e-3",
                          f"lud.placeholder_id={vocab}"])
    config, params = extend_vocab(base, tuned_params, 1)
    tokens = []
    for path in code_files:
        tokens += tokenizer.encode(path.read_text("utf-8"), add_bos=True)
        if len(tokens) >= size["lud_tokens"]:
            break
    summary, lud_params, stats = finetune_lud(config, params,
                                              np.asarray(tokens[:size["lud_tokens"]]))
    beta, sweep = choose_lud_beta(Transformer(config.model), lud_params, tune_prompts,
                                  size["new_tokens"])
    return {"step": summary["step"], "loss": summary["loss"], "eval_loss": None,
            "tokens_per_s": summary["tokens_per_s"], "params": config.model.num_params(),
            "model_dir": summary["model_dir"], "rows": stats, "beta": beta,
            "beta_sweep": sweep}


def choose_lud_beta(model, params, prompts: list[list[int]], new_tokens: int):
    """``(beta, {beta: tokens per model call})``: LUD's greedy decode of ``prompts`` (one
    batch, EOS ignored) at each of :data:`LUD_BETAS`; beta is the largest reaching
    :data:`LUD_MIN_TOKENS_PER_CALL`, else the one with the most (the first on ties). With
    no prompts: the default beta, unswept."""
    from cadenza.decode import DecodeConfig, generate
    from cadenza.decode.lud_config import LudConfig

    if not prompts:
        return LudConfig().beta, {}
    cfg = DecodeConfig(method="lud", max_new_tokens=new_tokens, ignore_eos=True)
    sweep = {b: generate(model, params, prompts, cfg, lud=LudConfig(beta=b)
                         ).stats["tokens_per_step"] for b in LUD_BETAS}
    enough = [b for b in LUD_BETAS if sweep[b] >= LUD_MIN_TOKENS_PER_CALL]
    return (enough[0] if enough else max(LUD_BETAS, key=sweep.get)), sweep


# --- the run ---------------------------------------------------------------------------------

def _log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"[quickstart] {msg}")


def run_quickstart(out_dir="runs/quickstart", fast: bool = False, large: bool = False,
                   progress: bool = True) -> dict:
    """Run the four stages (module docstring) and write the results under ``out_dir``.

    ``fast``: a few steps of tiny models (CI smoke test); ``large``: bigger models
    and more steps (for an accelerator). Rerunning into the same ``out_dir`` reuses
    finished stages and resumes interrupted training. Returns the results dict that is
    also written to ``results.json``: ``meta``, ``sizes``, ``timings_s`` per stage,
    ``data`` (dataset reports), ``unigram`` (baselines), ``train`` (fit summaries),
    ``lora`` (held-out losses or the reason it is unavailable), ``task`` (measured task
    before/after), ``samples`` and ``decode`` (one row per method, timing settings).
    """
    from cadenza.decode.ngram_table import build_from_files, tokenizer_fingerprint
    from cadenza.models import Transformer, load_model
    from cadenza.outputs import atomic_dir, is_complete
    from cadenza.train.data import build_iterator, stdlib

    if fast and large:
        from cadenza.errors import ConfigError
        raise ConfigError("fast and large exclude each other", where="quickstart",
                          fix="pass at most one of --fast / --large")
    size_name = "fast" if fast else "large" if large else "default"
    size = SIZES[size_name]
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out, size)
    results = {"meta": {**provenance(pathlib.Path(__file__).parent), "size": size_name},
               "sizes": size, "timings_s": {}}
    t_all = time.perf_counter()
    progress_override = [] if progress else ["train.progress_bar=false"]
    marks = [t_all]

    def stage(name):
        """Record the time since the previous stage ended as ``name``'s."""
        marks.append(time.perf_counter())
        results["timings_s"][name] = marks[-1] - marks[-2]

    # 1. data + tokenizer + unigram baselines
    _log(f"1/4 data: stdlib corpus + instruction pairs, BPE tokenizer (vocab "
         f"{size['vocab_size']}) -> {out / 'data'}")
    evals = [f"train.eval_every={size['eval_every']}"]
    pretrain = [*progress_override, *evals, "data.truncation=chunk",
                f"data.shuffle_window={PRETRAIN_SHUFFLE_WINDOW}"]
    code_cfg = experiment("target", out, size, size["target"], fmt="stdlib_code",
                          steps=size["target_steps"], extra=pretrain)
    draft_cfg = experiment("draft", out, size, size["draft"], fmt="stdlib_code",
                           steps=size["draft_steps"], extra=pretrain)
    sft_cfg = experiment("sft", out, size, size["target"], fmt="stdlib_instruct",
                         steps=size["lora_steps"], extra=[
                             *progress_override, *evals, "peft.method=lora",
                             f"train.init_from={out / 'target' / 'model'}",
                             f"peft.rank={size['lora_rank']}", "train.learning_rate=5e-3"])
    # the draft verified against the tuned target learns that target's distributions
    teacher = out / ("sft" if have("cadenza.train.peft.task") else "target") / "model"
    distill_cfg = experiment("distill", out, size, size["draft"], fmt="stdlib_instruct",
                             steps=size["distill_steps"], extra=[
                                 *progress_override, *evals, "train.task=distill",
                                 f"train.init_from={teacher}",
                                 f"train.distill.student={out / 'draft' / 'model'}",
                                 "train.learning_rate=1e-3"])
    medusa_cfg = experiment("medusa", out, size, size["target"], fmt="stdlib_instruct",
                            steps=size["medusa_steps"], extra=[
                                *progress_override, "train.task=medusa",
                                f"train.init_from={out / 'sft' / 'model'}",
                                "train.learning_rate=1e-3"])

    def data_stage():
        reports = {}
        for name, cfg in (("code", code_cfg), ("instruct", sft_cfg)):
            it = build_iterator(cfg, split="train")
            next(it)
            reports[name] = [{k: r[k] for k in ("read", "written", "skipped", "splits")}
                             for r in it.build_reports]
        return {"reports": reports, "unigram": {
            "code": unigram_cross_entropy(code_cfg, 8 * size["eval_steps"]),
            "instruct": unigram_cross_entropy(sft_cfg, 8 * size["eval_steps"])}}

    data = stages.run("data", data_stage)
    results["data"], results["unigram"] = data["reports"], data["unigram"]
    tokenizer = build_iterator(sft_cfg, split="train").tokenizer
    stage("data")

    # 2. pretraining
    _log("2/4 pretraining the target and the draft model on the code corpus (unigram "
         f"baseline {results['unigram']['code']['heldout']:.3f} nats held-out)")
    results["train"] = {}
    for name, cfg in (("target", code_cfg), ("draft", draft_cfg)):
        t = results["train"][name] = stages.run(name, lambda cfg=cfg: _fit_summary(cfg))
        _log(f"{name}: {t['params'] / 1e6:.2f}M params, loss {t['loss']:.3f} (held-out "
             f"{t['eval_loss'] or float('nan'):.3f}) after {t['step']} steps")
    stage("pretrain")

    # 3. LoRA instruction tuning, the measured task, Medusa heads, the LUD model
    _log("3/4 LoRA instruction tuning of the target on docstring -> body pairs")
    code_files = [stdlib.stdlib_root() / rel for rel in stdlib.stdlib_files(size["modules"])]
    target = Transformer(code_cfg.model)
    _, target_params = load_model(out / "target" / "model")
    examples = task_examples(tokenizer, size["modules"], 0.1, size["seq_len"],
                             size["max_body_tokens"], PER_MODULE,
                             max(size["task_examples"], size["prompts"]))

    def lora_stage():
        lora = {"heldout_loss_before": heldout_loss(sft_cfg, target_params,
                                                    size["eval_steps"])}
        task = {}
        measure = dict(new_tokens=size["new_tokens"], samples=size["task_samples"])
        task["before"], before = measure_task(target, target_params, examples, tokenizer,
                                              **measure)
        if not have("cadenza.train.peft.task"):
            lora["unavailable"] = "not available in this build (cadenza.train.peft is missing)"
            return {"lora": lora, "task": task, "bodies": {"before": before}}
        summary = _fit_summary(sft_cfg)
        _, tuned = load_model(summary["model_dir"])
        lora.update(heldout_loss_after=heldout_loss(sft_cfg, tuned, size["eval_steps"]),
                    steps=summary["step"])
        task["after"], after = measure_task(target, tuned, examples, tokenizer, **measure)
        return {"lora": lora, "task": task, "train": summary,
                "bodies": {"before": before, "after": after}}

    tuned_stage = stages.run("lora", lora_stage)
    results["lora"], results["task"] = tuned_stage["lora"], tuned_stage["task"]
    if "train" in tuned_stage:
        results["train"]["sft"] = tuned_stage["train"]
        _, tuned_params = load_model(out / "sft" / "model")
    else:
        tuned_params = target_params
    results["samples"] = _samples(examples, tuned_stage["bodies"])
    _log(f"held-out loss {results['lora']['heldout_loss_before']:.3f} -> "
         f"{results['lora'].get('heldout_loss_after', float('nan')):.3f}; task "
         + ", ".join(f"{k}: {json.dumps(v)}" for k, v in results["task"].items()))
    extras = {}
    if have("cadenza.train.distill_task"):
        results["train"]["distill"] = stages.run("distill", lambda: _fit_summary(distill_cfg))
    if "train" in tuned_stage:
        results["train"]["medusa"] = stages.run("medusa", lambda: _fit_summary(medusa_cfg))
        extras["medusa_dir"] = results["train"]["medusa"]["adapters_dir"]
        spare = [e["prompt"] for e in examples[size["prompts"]:]]
        results["train"]["lud"] = stages.run("lud", lambda: _lud_model(
            out, size, sft_cfg, tuned_params, tokenizer, code_files, spare))
    else:
        extras["medusa_skipped"] = extras["lud_skipped"] = "no tuned target (LoRA unavailable)"
    stage("tune")

    # 4. decoding
    _log("4/4 decoding held-out docstrings with every method in this build")
    ngram_dir = out / "ngram"
    if not is_complete(ngram_dir):  # written whole or not at all
        with atomic_dir(ngram_dir, replace=True) as tmp:
            build_from_files([str(p) for p in code_files], tmp, tokenizer=tokenizer,
                             tokenizer_id={"kind": "dir", "sha256":
                                           tokenizer_fingerprint(tokenizer.directory)},
                             max_order=6)
    extras["ngram_dir"] = ngram_dir
    if "lud" in results["train"]:
        from cadenza.decode.lud_config import LudConfig

        lud_cfg, lud_params = load_model(results["train"]["lud"]["model_dir"])
        lud = results["train"]["lud"]
        extras["lud"] = (Transformer(lud_cfg.model), lud_params,
                         LudConfig(placeholder_id=lud_cfg.model.vocab_size - 1, beta=lud["beta"]))
        extras["lud_beta_note"] = ("chosen on spare held-out prompts, tokens per call: " +
                                   ", ".join(f"{float(b):g}: {v:.2f}"
                                             for b, v in lud["beta_sweep"].items())
                                   if lud["beta_sweep"] else "the default; no spare prompts "
                                   "to choose it on")
    _, draft_params = load_model(out / "draft" / "model")
    if "distill" in results["train"]:
        _, extras["distilled_draft"] = load_model(results["train"]["distill"]["model_dir"])
    timed = examples[:size["prompts"]]
    ctx = Context(target, tuned_params, Transformer(draft_cfg.model), draft_params, tokenizer,
                  [e["prompt"] for e in timed], size["new_tokens"], out, extras)
    results["decode"] = stages.run("decode", lambda: _decode_stage(ctx, size, timed))
    stage("decode")
    results["timings_s"]["total"] = time.perf_counter() - t_all
    write_results(out, results)
    _log(f"done in {results['timings_s']['total']:.0f}s; results in {out / 'results.md'}")
    print(render_markdown(results))
    return results


def _samples(examples: list[dict], bodies: dict, count: int = 3) -> list[dict]:
    """Up to ``count`` examples from different modules with each model's greedy body."""
    shown, modules = [], set()
    for i, e in enumerate(examples):
        module = e["where"].split(":")[0]
        if module in modules:
            continue
        modules.add(module)
        shown.append({"where": e["where"], "header": e["header"], "body": e["body"],
                      **{k: v[i] for k, v in bodies.items()}})
        if len(shown) == count:
            break
    return shown


def _decode_stage(ctx: Context, size: dict, timed: list[dict]) -> dict:
    """Build every method, time the available ones interleaved, and tabulate them."""
    methods, rows = {}, {}
    for name, builder in DECODE_METHODS:
        try:
            methods[name] = builder(ctx)
        except Unavailable as e:
            rows[name] = {"method": name, "available": False, "notes": str(e)}
    timings = time_methods(methods, size["repeats"])
    greedy_ids = timings["greedy"]["token_ids"]
    for name, t in timings.items():
        m = methods[name]
        rows[name] = {"method": name, "available": True, "notes": m.notes,
                      "tokens": t["tokens"], "tokens_per_s": t["tokens_per_s"],
                      "decode_tokens_per_s": t["decode_tokens_per_s"], "speedup": t["speedup"],
                      "accepted_per_forward": t["accepted_per_forward"],
                      "deterministic": t["deterministic"],
                      "matches_greedy": (t["token_ids"] == greedy_ids
                                         if m.greedy_equivalent else None)}
    first = timed[0]
    eos = ctx.tokenizer.eos_id

    def until_eos(ids):   # the timed runs ignore EOS; the shown text ends there
        return ids[:ids.index(eos)] if eos in ids else ids

    texts = {name: ctx.tokenizer.decode(until_eos(t["token_ids"][0]))
             for name, t in timings.items()}
    return {"prompts": len(timed), "modules": len({e["where"].split(":")[0] for e in timed}),
            "new_tokens": size["new_tokens"], "repeats": size["repeats"],
            "prompt_where": [e["where"] for e in timed],
            "rows": [rows[name] for name, _ in DECODE_METHODS],
            "method_samples": {"where": first["where"], "texts": texts}}
