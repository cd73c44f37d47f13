"""The quickstart's report: ``results.json``, ``results.md`` and ``results.png``."""

import json
import pathlib

from cadenza.outputs import atomic_file


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _spread(s: dict | None, spec: str, suffix: str = "") -> str:
    if s is None:
        return "—"
    return (f"{format(s['median'], spec)}{suffix} ({format(s['min'], spec)}–"
            f"{format(s['max'], spec)})")


def _code(text: str) -> list[str]:
    return ["```python", text.rstrip() or "(empty)", "```"]


def render_markdown(results: dict) -> str:
    """The results as a Markdown report: meta line, training (with the unigram baseline),
    LoRA (held-out loss and the measured task before/after), samples, decoding table."""
    m = results["meta"]
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in results["timings_s"].items()
                        if k != "total")
    lines = [f"# cadenza quickstart ({m['size']})", "",
             f"device: {m['device']} ({m['device_kind']}, {m['num_devices']} device(s)), "
             f"jax {m['jax']}, commit {m['commit']}, {m['date']}; total "
             f"{results['timings_s'].get('total', 0):.0f}s ({timings})", ""]
    uni = results["unigram"]
    lines += ["## Training", "",
              f"A unigram model (token frequencies, no context) reaches {uni['code']['train']:.3f}"
              f" nats on the code corpus and {uni['code']['heldout']:.3f} on its held-out modules;"
              f" {uni['instruct']['heldout']:.3f} on held-out function bodies. Losses below those"
              " numbers are what the models learned from context.", "",
              "| model | params | steps | final loss | held-out loss | unigram (held-out) "
              "| tokens/s |", "|---|---|---|---|---|---|---|"]
    for name, t in results["train"].items():
        base = ("— (its loss: KL from the tuned target)" if name == "distill" else
                f"{uni['instruct' if name in ('sft', 'medusa') else 'code']['heldout']:.3f}")
        lines.append(f"| {name} | {t['params'] / 1e6:.2f}M | {t['step']} | "
                     f"{_fmt(t['loss'], '.3f')} | {_fmt(t.get('eval_loss'), '.3f')} | "
                     f"{base} | {_fmt(t['tokens_per_s'], '.0f')} |")
    lora = results["lora"]
    lines += ["", "## LoRA instruction tuning (held-out modules)", ""]
    if "unavailable" in lora:
        lines.append(f"held-out loss of the pretrained target: {lora['heldout_loss_before']:.3f}"
                     f"; LoRA: {lora['unavailable']}")
    else:
        lines.append(f"held-out loss on function bodies: {lora['heldout_loss_before']:.3f} "
                     f"before -> {lora['heldout_loss_after']:.3f} after {lora['steps']} LoRA "
                     f"steps (unigram: {uni['instruct']['heldout']:.3f})")
    task = results.get("task")
    if task:
        lines += ["", f"Measured task: write the body of {task['before']['examples']} held-out "
                  "functions from their signature and docstring. *first line exact*: the greedy "
                  "body's first line equals the original's; *compiles*: the greedy body compiles "
                  f"as the function's body; *pass@k*: of {task['before']['samples']} sampled "
                  "bodies (temperature 0.8), the unbiased estimate that one of k compiles (each "
                  "checked in a separate, resource-limited Python process; nothing is executed).",
                  "", "| model | first line exact | compiles (greedy) | "
                  + " | ".join(k for k in task["before"] if k.startswith("pass@")) + " |",
                  "|---|---|---|" + "---|" * sum(k.startswith("pass@") for k in task["before"])]
        for label, key in (("pretrained target", "before"), ("after LoRA", "after")):
            if key in task:
                s = task[key]
                lines.append(f"| {label} | {s['first_line_exact']:.2f} | "
                             f"{s['greedy_compiles']:.2f} | " + " | ".join(
                                 f"{v:.2f}" for k, v in s.items() if k.startswith("pass@"))
                             + " |")
    if results.get("samples"):
        lines += ["", "## Samples (held-out functions, greedy)", ""]
        for s in results["samples"]:
            lines += [f"### {s['where']}", "", "Prompt (signature and docstring):", "",
                      *_code(s["header"]), "", "Original body:", "", *_code(s["body"]), ""]
            for label in ("before", "after"):
                if label in s:
                    lines += [f"{'Pretrained target' if label == 'before' else 'After LoRA'}:",
                              "", *_code(s[label]), ""]
    dec = results["decode"]
    lines += ["", f"## Decoding ({dec['prompts']} held-out prompts from {dec['modules']} modules, "
              f"one at a time, {dec['new_tokens']} new tokens each (EOS ignored, so every "
              f"method writes as many tokens); median (min–max) of "
              f"{dec['repeats']} interleaved repeats)", "",
              "| method | tokens/s end to end | decode-only tokens/s | speedup vs greedy | "
              "accepted tokens / target forward | reproduces greedy exactly | notes |",
              "|---|---|---|---|---|---|---|"]
    for r in dec["rows"]:
        if not r["available"]:
            lines.append(f"| {r['method']} | — | — | — | — | — | {r['notes']} |")
            continue
        match = {True: "yes", False: "NO", None: "n/a"}[r["matches_greedy"]]
        note = r["notes"]
        sp = r["speedup"]
        if sp["min"] < 1.0 < sp["max"]:
            note += "; speedup spread straddles 1.0 (not a reliable difference)"
        lines.append(f"| {r['method']} | {_spread(r['tokens_per_s'], '.0f')} | "
                     f"{_spread(r['decode_tokens_per_s'], '.0f')} | {_spread(sp, '.2f', 'x')} | "
                     f"{_fmt(r['accepted_per_forward'], '.2f')} | {match} | {note} |")
    if dec.get("method_samples"):
        lines += ["", f"### What each method wrote for {dec['method_samples']['where']}", ""]
        for name, text in dec["method_samples"]["texts"].items():
            lines += [f"{name}:", "", *_code(text), ""]
    return "\n".join(lines).rstrip() + "\n"


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_bytes(data)


def write_results(out: pathlib.Path, results: dict) -> None:
    """Write ``results.json``, ``results.md`` and ``results.png`` (training and held-out
    losses per model beside the unigram baselines; decoding tokens/s with min–max error
    bars), each atomically (a temporary sibling renamed into place)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _write_atomic(out / "results.json",
                  (json.dumps(results, indent=2, default=str) + "\n").encode())
    _write_atomic(out / "results.md", render_markdown(results).encode())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in results["train"]:
        path = out / name / "metrics.jsonl"
        if not path.is_file():
            continue
        recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        label = f"{name} (KL)" if name == "distill" else name
        line, = ax1.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=label)
        ev = [r for r in recs if "eval_loss" in r]
        if ev:
            ax1.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o--",
                     color=line.get_color(), label=f"{label} held-out")
    for key, style in (("code", ":"), ("instruct", "-.")):
        ax1.axhline(results["unigram"][key]["heldout"], color="gray", linestyle=style,
                    label=f"unigram, held-out {key}")
    ax1.set(xlabel="step", ylabel="loss (nats)", title="training and held-out loss",
            xscale="symlog")
    ax1.legend(fontsize=7)
    rows = [r for r in results["decode"]["rows"] if r["available"]]
    med = [r["tokens_per_s"]["median"] for r in rows]
    err = [[r["tokens_per_s"]["median"] - r["tokens_per_s"]["min"] for r in rows],
           [r["tokens_per_s"]["max"] - r["tokens_per_s"]["median"] for r in rows]]
    ax2.barh([r["method"] for r in rows], med, xerr=err, capsize=3)
    if med and max(med) / max(min(med), 1e-9) > 30:
        ax2.set_xscale("log")
    ax2.set(xlabel="tokens/s end to end (median, min–max)",
            title="decoding held-out prompts (batch 1)")
    m = results["meta"]
    fig.suptitle(f"cadenza quickstart: {m['device']} ({m['device_kind']}), jax {m['jax']}, "
                 f"commit {m['commit']}, {m['date']}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    _write_atomic(out / "results.png", buf.getvalue())
