"""LoRA step time / full fine-tuning step time, the two steps interleaved round by round.

    .venv/bin/python bench/train_lora_ratio.py [--size 10m] [--repeats 7] [--name train_lora_ratio]
        [--out DIR]

Both steps are ``bench/train_throughput.py``'s (same Llama weights, batch 8 x 256, AdamW,
clip 1.0, float32; LoRA rank 8, alpha 16 on q, k, v, o). Each round times one full step and
one LoRA step back to back (after one untimed step each), so both see the same machine
load; the ratio is the median of the per-round ratios, with its spread. (``train_throughput``
runs its setups one after another, so its LoRA/full line mixes loads.) Writes
``bench/results/<device>/<name>.{json,md}``.
"""

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import jax
from train_throughput import CadenzaSide, bench_inputs  # a sibling script (bench/ is on sys.path)

from cadenza.provenance import provenance, results_dir


def step_seconds(side: CadenzaSide) -> float:
    """Wall seconds of one train step of ``side`` (after one untimed step)."""
    with jax.set_mesh(side.mesh):
        side.train_step()["loss"].block_until_ready()
        start = time.perf_counter()
        side.train_step()["loss"].block_until_ready()
        return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="10m")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--name", default="train_lora_ratio")
    p.add_argument("--out", default=None, help="results folder (default: bench/results/<device>)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sides = {mode: CadenzaSide(*bench_inputs(args.size, "float32", mode, pathlib.Path(tmp),
                                                 False)) for mode in ("full", "lora")}
        times = {mode: [] for mode in sides}
        for _ in range(args.repeats):
            for mode, side in sides.items():
                times[mode].append(step_seconds(side))
    ratios = [lo / fu for lo, fu in zip(times["lora"], times["full"])]
    med = {mode: statistics.median(t) for mode, t in times.items()}
    meta = provenance()
    out = results_dir(__file__, args.out)
    (out / f"{args.name}.json").write_text(json.dumps(
        {**meta, "size": args.size, "step_s": times, "ratios": ratios}, indent=2) + "\n")
    md = (f"# LoRA step / full fine-tuning step ({meta['device']})\n\n"
          f"jax {meta['jax']}, commit {meta['commit']}, {meta['date']}, {meta['cpu_count']} CPU "
          f"cores, host load average {meta['load_avg_1m']:.1f} at the end (shared machine: "
          f"absolute times are noisy, the interleaved ratio less so). {args.size}, float32, "
          f"batch 8 x 256, AdamW, clip 1.0; LoRA rank 8 on q, k, v, o. Medians of "
          f"{args.repeats} interleaved rounds, [min-max].\n\n"
          f"| size | full step s | LoRA step s | LoRA / full |\n|---|---|---|---|\n"
          f"| {args.size} | {med['full']:.3f} [{min(times['full']):.3f}-{max(times['full']):.3f}]"
          f" | {med['lora']:.3f} [{min(times['lora']):.3f}-{max(times['lora']):.3f}] | "
          f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}] |\n")
    (out / f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
