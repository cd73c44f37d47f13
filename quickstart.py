"""``cadenza quickstart``: the main job end to end, on whatever device JAX finds.

Nothing is downloaded: the interpreter's standard library is the corpus.

1. **Data**: the stdlib code corpus (``stdlib_code``) and docstring -> body
   instruction pairs (``stdlib_instruct``) are built as TFDS datasets, and a
   byte-level BPE tokenizer is trained on the code (``cadenza.train.data``).
2. **Pretraining**: a small target model and a much smaller draft model are
   trained on the code corpus with :func:`cadenza.train.fit`; each module is cut into
   ``seq_len`` pieces (``data.truncation=chunk``, pieces shuffled in windows of
   :data:`PRETRAIN_SHUFFLE_WINDOW`), so the models see whole modules, not only their
   first ``seq_len`` tokens.
3. **Instruction tuning**: the target is LoRA-tuned on the instruction pairs;
   the held-out (per-module split) loss is measured before and after.
4. **Decoding**: held-out docstrings are completed with every decoding method
   this build has (greedy, speculative decoding with the draft model or an
   n-gram drafter, Superposed Decoding with k = 3, LUD); a table reports
   tokens/s, speedup over greedy, accepted tokens per target forward and
   whether the greedy-equivalent methods reproduced greedy exactly.

A stage whose library is not part of this build is reported as "not available
in this build" (never a made-up number). Decoding methods are entries of
:data:`DECODE_METHODS`; a new one is a function ``(ctx) -> MethodRun``.

Everything lands under ``out_dir``: ``data/`` (datasets, tokenizer),
``target/``, ``draft/``, ``sft/`` (each a ``fit`` output: checkpoints,
``tensorboard/``, ``metrics.jsonl``, ``model/``), ``ngram/`` (the n-gram
table), ``results.json``, ``results.md`` and ``results.png``.
"""

import dataclasses
import importlib.util
import json
import pathlib
import time
from collections.abc import Callable

from cadenza.provenance import provenance

# Sizes: {name: settings}. "fast" is for CI smoke tests; "default" fits in 10 minutes on
# two CPU cores; "large" is for an accelerator.
SIZES: dict[str, dict] = {
    "fast": dict(
        target=dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                    intermediate_size=128),
        draft=dict(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1,
                   intermediate_size=64),
        vocab_size=384, seq_len=192, batch_size=8, target_steps=6, draft_steps=4, lora_steps=4,
        eval_steps=2, prompts=2, new_tokens=8, lora_rank=4,
        modules=["textwrap.py", "bisect.py", "heapq.py", "fnmatch.py", "shlex.py", "glob.py",
                 "string/__init__.py", "sched.py", "secrets.py"]),
    "default": dict(
        target=dict(num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2,
                    intermediate_size=384),
        draft=dict(num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=1,
                   intermediate_size=192),
        vocab_size=512, seq_len=128, batch_size=8, target_steps=60, draft_steps=60,
        lora_steps=30, eval_steps=4, prompts=3, new_tokens=32, lora_rank=8,
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
        vocab_size=2048, seq_len=512, batch_size=16, target_steps=2000, draft_steps=1000,
        lora_steps=300, eval_steps=16, prompts=8, new_tokens=128, lora_rank=16,
        modules=None),
}

# Pieces shuffled together when pretraining on chunked modules: ~40 modules' worth at
# seq_len 128 (filling it tokenizes them, ~7 s on two CPU cores).
PRETRAIN_SHUFFLE_WINDOW = 4096


class Unavailable(Exception):
    """A stage whose library is not part of this build (reported, never faked)."""


@dataclasses.dataclass
class MethodRun:
    """One decoding method over the prompts (timed after a warm-up call that compiles).

    ``token_ids``: generated ids per prompt; ``seconds``: wall time of the fastest of
    two timed passes over all prompts; ``accepted_per_forward``: tokens emitted per
    target forward in the decode loop (None where it does not apply);
    ``greedy_equivalent``: the method promises greedy's output exactly; ``notes``: shown
    in the table.
    """

    token_ids: list[list[int]]
    seconds: float
    accepted_per_forward: float | None
    greedy_equivalent: bool
    notes: str = ""


@dataclasses.dataclass
class Context:
    """What the decoding methods need: models, params, prompts and settings."""

    target: object          # Transformer of the (instruction-tuned) target
    target_params: dict
    draft: object           # Transformer of the draft model
    draft_params: dict
    tokenizer: object
    prompts: list[list[int]]
    new_tokens: int
    out_dir: pathlib.Path
    code_files: list[pathlib.Path]
    extras: dict = dataclasses.field(default_factory=dict)


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _require(module: str) -> None:
    if not _have(module):
        raise Unavailable(f"not available in this build ({module} is missing)")


def _timed(fn: Callable[[], object], repeats: int = 2) -> tuple[object, float]:
    """Call ``fn`` once to compile, then ``repeats`` times; the output and the fastest time."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


# --- decoding methods ------------------------------------------------------------------------

def _run_method(ctx: Context, name: str, fields: dict, resources: dict, notes: str,
                greedy_equivalent: bool) -> MethodRun:
    """Run the registry's method ``name`` (config ``fields`` as in ``with_fields``, in-memory
    ``resources``) on every prompt, one prompt per call."""
    from cadenza.decode import DecodeConfig, generate
    from cadenza.decode.config import with_fields
    from cadenza.decode.registry import entry

    entry(name)
    cfg = with_fields(DecodeConfig(method=name, max_new_tokens=ctx.new_tokens), **fields)

    def run():
        return [generate(ctx.target, ctx.target_params, [p], cfg, **resources)
                for p in ctx.prompts]

    results, seconds = _timed(run)
    per_forward = 1.0 if name == "greedy" else None
    forwards = sum(r.stats.get("target_forwards", 0) for r in results)
    if forwards:
        per_forward = sum(len(r.token_ids[0]) - 1 for r in results) / forwards
    return MethodRun([r.token_ids[0] for r in results], seconds, per_forward,
                     greedy_equivalent=greedy_equivalent, notes=notes)


def _greedy(ctx: Context) -> MethodRun:
    return _run_method(ctx, "greedy", {}, {}, "one target forward per token (KV cache, jitted "
                       "while_loop)", greedy_equivalent=True)


def _speculative_draft_model(ctx: Context) -> MethodRun:
    _require("cadenza.decode.speculative")
    from cadenza.decode.speculative import DraftModel

    gamma = 4
    return _run_method(ctx, "speculative", {"speculative__gamma": gamma},
                       {"drafter": DraftModel(ctx.draft.config, gamma=gamma),
                        "draft_params": (ctx.draft_params, None)},
                       f"draft model ({ctx.draft.config.num_params() / 1e6:.2f}M params), "
                       f"gamma={gamma}, greedy acceptance", greedy_equivalent=True)


def _speculative_ngram(ctx: Context) -> MethodRun:
    _require("cadenza.decode.prompt_lookup")
    return _run_method(ctx, "ngram", {"speculative__gamma": 4, "speculative__ngram_max": 3}, {},
                       "prompt-lookup n-gram drafts (no draft model), gamma=4",
                       greedy_equivalent=True)


def _superposed(ctx: Context) -> MethodRun:
    from cadenza.decode.ngram_table import load_ngram_table

    table = load_ngram_table(ctx.extras["ngram_dir"]).to_device()
    return _run_method(ctx, "superposed", {"superposed__num_drafts": 3}, {"table": table},
                       "k=3 drafts from one stream; tokens/s counts the best draft",
                       greedy_equivalent=False)


def _lud(ctx: Context) -> MethodRun:
    _require("cadenza.decode.lud")
    raise Unavailable("not run: LUD needs its own fine-tune (with a free placeholder token id), "
                      "which this quickstart does not include yet")


# (label, function), one per registered method the quickstart runs (names checked against
# cadenza.decode.registry). A method whose library is missing raises Unavailable.
DECODE_METHODS: list[tuple[str, Callable[[Context], MethodRun]]] = [
    ("greedy", _greedy),
    ("speculative (draft model)", _speculative_draft_model),
    ("speculative (n-gram draft)", _speculative_ngram),
    ("superposed (k=3)", _superposed),
    ("LUD", _lud),
]


# --- configs, data, training -----------------------------------------------------------------

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
        "train.log_every=5", f"train.checkpoint_every={steps}", "train.keep_checkpoints=1",
        f"train.eval_steps={size['eval_steps']}", "mesh.data=-1",
        f"model.vocab_size={size['vocab_size']}", f"data.format={fmt}",
        f"data.data_dir={out_dir / 'data'}", "data.heldout_fraction=0.1",
        *_overrides(model), *extra]
    if modules is not None:
        overrides.append("data.stdlib_modules=[" + ",".join(modules) + "]")
    return load_config(None, overrides, preset="tiny")


def heldout_loss(config, params, max_batches: int) -> float:
    """Mean next-token cross-entropy of ``params`` over the held-out ("test") split of
    ``config``'s data, on counted (assistant) tokens of at most ``max_batches`` batches."""
    import jax

    from cadenza.models import Transformer
    from cadenza.train.data import build_iterator
    from cadenza.train.step import token_losses

    model = Transformer(config.model)

    @jax.jit
    def losses(params, batch):
        logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                             segment_ids=batch["segment_ids"])[0]
        _, ce, count = token_losses(logits, batch["targets"], batch["loss_mask"])
        return ce, count

    ce = count = 0.0
    for i, batch in enumerate(build_iterator(config, split="test")):
        if i == max_batches:
            break
        c, n = losses(params, batch)
        ce, count = ce + float(c), count + float(n)
    return ce / max(count, 1.0)


def lora_tune(config) -> dict:
    """LoRA-tune ``config.train.init_from`` with ``config`` (``peft.method=lora``) via
    :func:`cadenza.train.fit`; returns its summary (``model_dir``: the merged model).

    Raises Unavailable when this build has no PEFT training task."""
    _require("cadenza.train.peft.task")
    from cadenza.train import fit

    return fit(config)


def heldout_prompts(tokenizer, size: dict, count: int) -> list[tuple[str, list[int]]]:
    """``count`` docstring prompts from held-out modules: (source location, chat-rendered
    token ids ending with the assistant turn's opening)."""
    from cadenza.models.chat_template import ChatTemplate
    from cadenza.train.data import stdlib

    template = ChatTemplate.from_tokenizer(tokenizer)
    root = stdlib.stdlib_root()
    found = []
    for rel in stdlib.stdlib_files(size["modules"]):
        if not stdlib.is_heldout(rel, 0.1):
            continue
        for instruction, _, line in stdlib.instruction_pairs((root / rel).read_text("utf-8"), rel):
            text = template.render([{"role": "user", "content": instruction}],
                                   add_generation_prompt=True)
            ids = tokenizer.encode(text, add_bos=True)
            if len(ids) <= size["seq_len"]:
                found.append((f"{rel}:{line}", ids))
            if len(found) == count:
                return found
    return found


# --- the run ---------------------------------------------------------------------------------

def _log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"[quickstart] {msg}")


def run_quickstart(out_dir="runs/quickstart", fast: bool = False, large: bool = False,
                   progress: bool = True) -> dict:
    """Run the four stages (module docstring) and write the results under ``out_dir``.

    ``fast``: a few steps of tiny models (CI smoke test); ``large``: bigger models
    and more steps (for an accelerator). Returns the results dict that is also written
    to ``results.json``: ``meta``, ``sizes``, ``timings_s`` per stage, ``data`` (dataset
    reports), ``train`` (fit summaries), ``lora`` (held-out losses or the reason it is
    unavailable), ``prompts`` and ``decode`` (one row per method).
    """
    from tqdm import tqdm

    from cadenza.decode.ngram_table import build_from_files, tokenizer_fingerprint
    from cadenza.models import Transformer, load_model
    from cadenza.train import fit
    from cadenza.train.data import build_iterator, stdlib

    if fast and large:
        from cadenza.errors import ConfigError
        raise ConfigError("fast and large exclude each other", where="quickstart",
                          fix="pass at most one of --fast / --large")
    size_name = "fast" if fast else "large" if large else "default"
    size = SIZES[size_name]
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"meta": {**provenance(pathlib.Path(__file__).parent), "size": size_name},
               "sizes": size, "timings_s": {}}
    t_all = time.perf_counter()
    progress_override = [] if progress else ["train.progress_bar=false"]
    marks = [t_all]

    def stage(name):
        """Record the time since the previous stage ended as ``name``'s."""
        marks.append(time.perf_counter())
        results["timings_s"][name] = marks[-1] - marks[-2]

    # 1. data + tokenizer
    _log(f"1/4 data: stdlib corpus + instruction pairs, BPE tokenizer (vocab "
         f"{size['vocab_size']}) -> {out / 'data'}")
    pretrain = [*progress_override, "data.truncation=chunk",
                f"data.shuffle_window={PRETRAIN_SHUFFLE_WINDOW}"]
    code_cfg = experiment("target", out, size, size["target"], fmt="stdlib_code",
                          steps=size["target_steps"], extra=pretrain)
    draft_cfg = experiment("draft", out, size, size["draft"], fmt="stdlib_code",
                           steps=size["draft_steps"], extra=pretrain)
    sft_cfg = experiment("sft", out, size, size["target"], fmt="stdlib_instruct",
                         steps=size["lora_steps"], extra=[
                             *progress_override, "peft.method=lora",
                             f"train.init_from={out / 'target' / 'model'}",
                             f"peft.rank={size['lora_rank']}", "train.learning_rate=5e-3"])
    results["data"] = {}
    for name, cfg in (("code", code_cfg), ("instruct", sft_cfg)):
        it = build_iterator(cfg, split="train")
        next(it)
        results["data"][name] = [{k: r[k] for k in ("read", "written", "skipped", "splits")}
                                 for r in it.build_reports]
        tokenizer = it.tokenizer
    stage("data")

    # 2. pretraining
    _log("2/4 pretraining the target and the draft model on the code corpus")
    results["train"] = {}
    for name, cfg in (("target", code_cfg), ("draft", draft_cfg)):
        summary = fit(cfg)
        results["train"][name] = {"params": cfg.model.num_params(), **{
            k: summary[k] for k in ("step", "loss", "tokens_per_s", "compile_s", "model_dir")}}
        _log(f"{name}: {cfg.model.num_params() / 1e6:.2f}M params, loss {summary['loss']:.3f} "
             f"after {summary['step']} steps")
    stage("pretrain")

    # 3. LoRA instruction tuning
    _log("3/4 LoRA instruction tuning of the target on docstring -> body pairs")
    _, target_params = load_model(out / "target" / "model")
    lora = {"heldout_loss_before": heldout_loss(sft_cfg, target_params, size["eval_steps"])}
    tuned_params = target_params
    try:
        summary = lora_tune(sft_cfg)
        _, tuned_params = load_model(summary["model_dir"])
        lora["heldout_loss_after"] = heldout_loss(sft_cfg, tuned_params, size["eval_steps"])
        lora["steps"] = summary["step"]
    except Unavailable as e:
        lora["unavailable"] = str(e)
        _log(f"LoRA: {e}; decoding uses the pretrained target")
    results["lora"] = lora
    stage("lora")

    # 4. decoding
    _log("4/4 decoding held-out docstrings with every method in this build")
    code_files = [stdlib.stdlib_root() / rel for rel in stdlib.stdlib_files(size["modules"])]
    ngram_dir = out / "ngram"
    build_from_files([str(p) for p in code_files], ngram_dir, tokenizer=tokenizer,
                     tokenizer_id={"kind": "dir", "sha256":
                                   tokenizer_fingerprint(tokenizer.directory)}, max_order=6)
    prompts = heldout_prompts(tokenizer, size, size["prompts"])
    results["prompts"] = [loc for loc, _ in prompts]
    _, draft_params = load_model(out / "draft" / "model")
    ctx = Context(Transformer(code_cfg.model), tuned_params, Transformer(draft_cfg.model),
                  draft_params, tokenizer, [ids for _, ids in prompts], size["new_tokens"], out,
                  code_files, extras={"ngram_dir": ngram_dir})
    rows = []
    greedy = None
    for name, method in tqdm(DECODE_METHODS, desc="decode methods", unit="method",
                             disable=not progress):
        try:
            run = method(ctx)
        except Unavailable as e:
            rows.append({"method": name, "available": False, "notes": str(e)})
            continue
        rows.append(_row(name, run, greedy))
        if name == "greedy":
            greedy = run
    results["decode"] = rows
    results["sample"] = {"prompt": tokenizer.decode(ctx.prompts[0]),
                         "greedy": tokenizer.decode(greedy.token_ids[0])}
    stage("decode")
    results["timings_s"]["total"] = time.perf_counter() - t_all
    write_results(out, results)
    _log(f"done in {results['timings_s']['total']:.0f}s; results in {out / 'results.md'}")
    print(render_markdown(results))
    return results


def _row(name: str, run: MethodRun, greedy: MethodRun | None) -> dict:
    tokens = sum(len(i) for i in run.token_ids)
    tps = tokens / run.seconds if run.seconds > 0 else None
    row = {"method": name, "available": True, "tokens": tokens, "seconds": run.seconds,
           "tokens_per_s": tps, "notes": run.notes,
           "accepted_per_forward": run.accepted_per_forward}
    if greedy is None:
        row["speedup"] = 1.0
        row["matches_greedy"] = True if run.greedy_equivalent else None
    else:
        g_tps = sum(len(i) for i in greedy.token_ids) / greedy.seconds
        row["speedup"] = tps / g_tps if tps else None
        row["matches_greedy"] = (run.token_ids == greedy.token_ids
                                 if run.greedy_equivalent else None)
    return row


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def render_markdown(results: dict) -> str:
    """The results as a Markdown report (meta line, training, LoRA, decoding table)."""
    m = results["meta"]
    lines = [f"# cadenza quickstart ({m['size']})", "",
             f"device: {m['device']} ({m['device_kind']}, {m['num_devices']} device(s)), "
             f"jax {m['jax']}, commit {m['commit']}, {m['date']}; total "
             f"{results['timings_s'].get('total', 0):.0f}s "
             f"(" + ", ".join(f"{k} {v:.0f}s" for k, v in results["timings_s"].items()
                              if k != "total") + ")", "",
             "## Training", "", "| model | params | steps | final loss | tokens/s |",
             "|---|---|---|---|---|"]
    for name, t in results["train"].items():
        lines.append(f"| {name} | {t['params'] / 1e6:.2f}M | {t['step']} | {t['loss']:.3f} | "
                     f"{_fmt(t['tokens_per_s'], '.0f')} |")
    lora = results["lora"]
    lines += ["", "## LoRA instruction tuning (held-out modules)", ""]
    if "unavailable" in lora:
        lines.append(f"held-out loss of the pretrained target: {lora['heldout_loss_before']:.3f}"
                     f"; LoRA: {lora['unavailable']}")
    else:
        lines.append(f"held-out loss: {lora['heldout_loss_before']:.3f} before -> "
                     f"{lora['heldout_loss_after']:.3f} after {lora['steps']} LoRA steps")
    lines += ["", f"## Decoding ({len(results['prompts'])} held-out docstrings, one at a time)",
              "", "| method | tokens/s | speedup vs greedy | accepted tokens / target forward | "
              "reproduces greedy exactly | notes |", "|---|---|---|---|---|---|"]
    for r in results["decode"]:
        if not r["available"]:
            lines.append(f"| {r['method']} | — | — | — | — | {r['notes']} |")
            continue
        match = {True: "yes", False: "NO", None: "n/a"}[r["matches_greedy"]]
        lines.append(f"| {r['method']} | {_fmt(r['tokens_per_s'], '.1f')} | "
                     f"{_fmt(r['speedup'], '.2f')}x | {_fmt(r['accepted_per_forward'], '.2f')} | "
                     f"{match} | {r['notes']} |")
    return "\n".join(lines) + "\n"


def write_results(out: pathlib.Path, results: dict) -> None:
    """Write ``results.json``, ``results.md`` and ``results.png`` (training losses and
    decoding tokens/s, titled with device, jax version, commit and date)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(render_markdown(results))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("target", "draft", "sft"):
        path = out / name / "metrics.jsonl"
        if path.is_file():
            recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            ax1.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=name)
    ax1.set(xlabel="step", ylabel="training loss", title="training")
    ax1.legend()
    rows = [r for r in results["decode"] if r["available"]]
    ax2.barh([r["method"] for r in rows], [r["tokens_per_s"] or 0 for r in rows])
    ax2.set(xlabel="tokens/s", title="decoding (held-out docstrings)")
    m = results["meta"]
    fig.suptitle(f"cadenza quickstart: {m['device']} ({m['device_kind']}), jax {m['jax']}, "
                 f"commit {m['commit']}, {m['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=100)
    plt.close(fig)
