"""Run every benchmark under bench/ and summarise them: ``cadenza bench all`` / ``make bench``.

    .venv/bin/python bench/run_all.py [--quick] [--only a,b]

Each script runs from a staging copy of bench/ (as a subprocess in the repository root,
so caches such as trained bench models under ``runs/`` are reused between runs, with
this repository's git metadata and reference env); every
JSON / Markdown / PNG it writes under its results folder is collected into
``bench/results/<device>/`` (``<device>-quick/`` with ``--quick``, so smoke runs never
replace real results). Then ``summary.md`` lists each benchmark with its device, jax
version, commit, date, exit status and run time, followed by each benchmark's own
table, and ``<name>.png`` plots are drawn for the benchmarks :data:`PLOTS` knows.

``--quick`` passes :data:`QUICK_ARGS` (short settings) to the scripts that have them.
"""

import argparse
import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from cadenza.provenance import device_label

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
QUICK_ARGS = {
    "train_throughput": ["--sizes", "10m", "--dtypes", "float32", "--modes", "full",
                         "--repeats", "1"],
    "decode_throughput": ["--configs", "tiny", "--batches", "1", "--dtypes", "float32",
                          "--hf-modes", "dynamic", "--repeats", "1", "--new-tokens", "16"],
    "decode_scan_layout": ["--configs", "10m", "--batches", "1", "--repeats", "1",
                           "--new-tokens", "8"],
    "kernels_attention": ["--size", "tiny", "--iters", "2"],
    "quant_agreement": ["--size", "smoke", "--prompts", "2", "--new-tokens", "8"],
    "quant_int8_error": ["--size", "smoke", "--prompts", "2", "--new-tokens", "8"],
    "superposed_bench": ["--steps", "10", "--prompts", "2", "--reps", "1", "--new-tokens", "8"],
    "quickstart_bench": ["--fast"],
    "speculative_bench": ["--target-steps", "20", "--draft-steps", "20", "--batch", "1",
                          "--new-tokens", "16", "--medusa-steps", "5", "--no-sweep",
                          "--repeats", "1"],
    "peft_memory": ["--steps", "2", "--layers", "2", "--hidden", "64", "--seq", "64"],
    "merge_select_bench": ["--quick"],
    "post_training_bench": ["--quick"],
    "preference_bench": ["--quick"],
    "serve_bench": ["--requests", "4", "--rates", "8", "--repeats", "1"],
}
RESULT_SUFFIXES = (".json", ".md", ".png")


def scripts() -> list[str]:
    """Names of the benchmark scripts (every bench/*.py but this one), sorted."""
    return sorted(p.stem for p in HERE.glob("*.py") if p.name != pathlib.Path(__file__).name)


def _git_dir() -> str | None:
    r = subprocess.run(["git", "rev-parse", "--absolute-git-dir"], capture_output=True,
                       text=True, cwd=ROOT)
    return r.stdout.strip() or None


def run_script(name: str, quick: bool, dest: pathlib.Path) -> dict:
    """Run ``bench/<name>.py`` in a staging copy; collect its result files into ``dest``."""
    with tempfile.TemporaryDirectory(prefix="cadenza-bench-") as tmp:
        stage = pathlib.Path(tmp)
        (stage / "bench").mkdir()
        for script in HERE.glob("*.py"):    # a script may import its siblings
            shutil.copy2(script, stage / "bench" / script.name)
        for shared in (".venv-ref",):
            if (ROOT / shared).exists():
                (stage / shared).symlink_to(ROOT / shared)
        env = dict(os.environ)
        git_dir = _git_dir()
        if git_dir:
            env["GIT_DIR"], env["GIT_WORK_TREE"] = git_dir, str(ROOT)
        cmd = [sys.executable, str(stage / "bench" / f"{name}.py"),
               *(QUICK_ARGS.get(name, []) if quick else [])]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        seconds = time.perf_counter() - t0
        collected = []
        results = stage / "bench" / "results"
        for path in sorted(results.rglob("*")) if results.is_dir() else []:
            if path.is_file() and path.suffix in RESULT_SUFFIXES:
                shutil.copy2(path, dest / path.name)
                collected.append(path.name)
    return {"script": name, "returncode": rc, "seconds": seconds, "files": collected,
            "args": QUICK_ARGS.get(name, []) if quick else []}


def _meta(data: dict) -> dict:
    """device / jax / commit / date from a result JSON (top level, ``meta``, or nested)."""
    found = {}
    for part in (data, data.get("meta", {}), data.get("quickstart", {}).get("meta", {})):
        for key in ("device", "jax", "commit", "date"):
            if key not in found and isinstance(part, dict) and part.get(key) is not None:
                found[key] = str(part[key])
    return found


def _bars(data: dict, name: str) -> tuple[list[str], dict[str, list[float]], str] | None:
    """(labels, {series: values}, axis label) for the benchmarks with a known layout; a
    value is a number, None, or {median, min, max} (drawn with an error bar)."""
    if name == "train_throughput":
        rs = data["results"]
        series = {"cadenza": [r["cadenza"]["tokens_per_s"] for r in rs]}
        if all(r.get("torch") for r in rs):
            series["PyTorch"] = [r["torch"]["tokens_per_s"] for r in rs]
        return [f"{r['size']} {r['dtype']} {r['mode']}" for r in rs], series, \
            "training tokens/s"
    if name.startswith("decode_throughput"):
        rs = data["rows"]
        labels = [f"{r['config']} {r['dtype']} b={r['batch']}" for r in rs]
        series = {"cadenza": [r["cadenza"]["decode_tokens_per_s"] for r in rs]}
        if all(r.get("transformers") for r in rs):
            series["transformers (best path)"] = [
                r["transformers"][r["transformers_best"]]["decode_tokens_per_s"] for r in rs]
        return labels, series, "greedy decode tokens/s (median, min-max)"
    if name == "kernels_attention":
        rs = data["flash"]
        return [r["impl"] for r in rs], {"forward": [r["fwd_ms"] for r in rs],
                                         "backward": [r["bwd_ms"] for r in rs]}, \
            "attention ms (lower is better)"
    if name == "quickstart_bench":
        rs = [r for r in data["quickstart"]["decode"]["rows"] if r["available"]]
        return [r["method"] for r in rs], {
            "tokens/s": [r["tokens_per_s"]["median"] for r in rs]}, \
            "quickstart decoding tokens/s (median)"
    return None


def plot(data: dict, name: str, path: pathlib.Path) -> bool:
    """Draw ``name``'s bar chart titled with its device, jax, commit and date; False if the
    layout of ``name`` is unknown."""
    bars = _bars(data, name)
    if bars is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, series, axis = bars
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(labels) * len(series) + 1.5))
    height = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        mid = [v["median"] if isinstance(v, dict) else v or 0 for v in values]
        err = None
        if any(isinstance(v, dict) for v in values):
            err = [[m - v["min"] if isinstance(v, dict) else 0 for m, v in zip(mid, values)],
                   [v["max"] - m if isinstance(v, dict) else 0 for m, v in zip(mid, values)]]
        ax.barh([j + i * height for j in range(len(labels))], mid, height, xerr=err,
                capsize=2, label=label)
    shown = [v["median"] if isinstance(v, dict) else v for vs in series.values() for v in vs]
    shown = [v for v in shown if v]
    if shown and max(shown) / min(shown) > 30:      # values span decades
        ax.set_xscale("log")
    ax.set_yticks([j + height * (len(series) - 1) / 2 for j in range(len(labels))], labels)
    ax.set_xlabel(axis)
    if len(series) > 1:
        ax.legend()
    m = _meta(data)
    ax.set_title(f"{name}: {m.get('device')}, jax {m.get('jax')}, commit {m.get('commit')}, "
                 f"{m.get('date')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def summarize(dest: pathlib.Path, runs: list[dict], quick: bool) -> str:
    """Write ``summary.md`` (and the plots) for the results in ``dest``; returns the text.

    Lists ``runs`` and, marked "not rerun", every other benchmark whose results are
    already in ``dest`` (each row keeps its own commit and date)."""
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    lines = [f"# Benchmarks ({dest.name}{', quick settings' if quick else ''})", "",
             f"Summary written {now}. Numbers below come from each benchmark's results file.", "",
             "| benchmark | device | jax | commit | date | exit | run time (s) | plot |",
             "|---|---|---|---|---|---|---|---|"]
    sections = []
    ran = {r["script"] for r in runs}
    earlier = [{"script": n, "returncode": "not rerun", "seconds": None,
                "files": [f.name for f in (dest / f"{n}.json", dest / f"{n}.md") if f.is_file()]}
               for n in scripts() if n not in ran and (dest / f"{n}.json").is_file()]
    for r in sorted(runs + earlier, key=lambda r: r["script"]):
        name = r["script"]
        js = dest / f"{name}.json"
        data = json.loads(js.read_text()) if js.is_file() and f"{name}.json" in r["files"] \
            else None
        m = _meta(data) if data else {}
        drawn = data is not None and plot(data, name, dest / f"{name}.png")
        seconds = "—" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {name} | {m.get('device', '—')} | {m.get('jax', '—')} | "
                     f"{m.get('commit', '—')} | {m.get('date', '—')} | {r['returncode']} | "
                     f"{seconds} | {f'![{name}]({name}.png)' if drawn else '—'} |")
        md = dest / f"{name}.md"
        if f"{name}.md" in r["files"]:
            body = md.read_text().strip().splitlines()
            sections += ["", f"## {name}", "", *[("#" + x if x.startswith("#") else x)
                                                  for x in body]]
        else:
            sections += ["", f"## {name}", "", f"no results (exit status {r['returncode']})"]
    text = "\n".join(lines + sections) + "\n"
    (dest / "summary.md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short settings (smoke run)")
    ap.add_argument("--only", default=None, help="comma-separated script names")
    args = ap.parse_args(argv)
    names = scripts()
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            print(f"error: unknown benchmark(s) {unknown}; available: {names}", file=sys.stderr)
            return 2
        names = [n for n in names if n in wanted]
    dest = HERE / "results" / (device_label() + ("-quick" if args.quick else ""))
    dest.mkdir(parents=True, exist_ok=True)
    runs = [run_script(n, args.quick, dest) for n in names]
    print(summarize(dest, runs, args.quick))
    failed = [r["script"] for r in runs if r["returncode"]]
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
