"""Where the train step's time goes: a jax.profiler trace of the jitted step, per XLA op.

    .venv/bin/python bench/train_profile.py [--setups 10m:float32:full,...] [--steps 3]
        [--top 12] [--name train_profile] [--out DIR]

The step is ``bench/train_throughput.py``'s (same sizes, batch 8 x 256, AdamW, clip 1.0).
After two warm-up steps, ``--steps`` steps run under ``jax.profiler.trace``; every XLA op
event of the trace (on CPU: the thunks the runtime's worker threads execute) is matched to
its instruction in the compiled program and put in one class:

- matmul: dots (XLA CPU runs most as YNNPACK fusions, ``ynn_fusion``);
- copy/transpose: fusions whose root copies or transposes data (layout changes);
- broadcast: buffers filled with a constant (e.g. zeroed stacks under a loop);
- slice/update: dynamic slices and dynamic-update-slices (loop stacking);
- elementwise/reduce: everything else (norms, softmax, loss, optimizer).

Times are summed over the worker threads, so they are CPU seconds per step (event time
includes time the thread was preempted: on a shared machine the shares are more telling
than the seconds). Blind spot: dots that YNNPACK does not take (XLA CPU's weight gradients
``x^T @ dy``, contracting the rows of both operands: plain ``dot`` instructions) run on
Eigen asynchronously, and their events cover little more than the dispatch; about a third
of the step's matmul FLOPs are there, so the matmul share is a lower bound.
Writes ``bench/results/<device>/<name>.{json,md}``.
"""

import argparse
import collections
import json
import pathlib
import re
import tempfile

import jax
from train_throughput import CadenzaSide, bench_inputs  # a sibling script (bench/ is on sys.path)

from cadenza.provenance import provenance, results_dir

CLASSES = ("matmul", "copy/transpose", "broadcast", "slice/update", "elementwise/reduce")
_INSTR = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+?) ([\w\-]+)\(")


def instructions(hlo_text: str) -> dict:
    """``{instruction name: (shape, opcode, jax op name)}`` of a compiled HLO module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            op_name = re.search(r'op_name="([^"]*)"', line)
            out[m.group(1)] = (m.group(2), m.group(3), op_name.group(1) if op_name else "")
    return out


def op_class(name: str, opcode: str) -> str:
    """The class (one of :data:`CLASSES`) of the instruction ``name`` with ``opcode``."""
    if name.startswith("ynn_fusion") or opcode in ("dot", "convolution"):
        return "matmul"
    if "copy" in name or "transpose" in name or opcode in ("copy", "transpose"):
        return "copy/transpose"
    if "broadcast" in name:
        return "broadcast"
    if "dynamic-slice" in name or "dynamic-update-slice" in name:
        return "slice/update"
    return "elementwise/reduce"


def profile(side: CadenzaSide, steps: int, trace_dir: str) -> dict[str, float]:
    """CPU seconds per step of each compiled instruction of ``side``'s train step."""
    from jax.profiler import ProfileData

    with jax.set_mesh(side.mesh):
        for _ in range(2):
            jax.block_until_ready(side.train_step())
        with jax.profiler.trace(trace_dir):
            for _ in range(steps):
                jax.block_until_ready(side.train_step())
    (path,) = pathlib.Path(trace_dir).rglob("*.xplane.pb")
    seconds: dict[str, float] = collections.defaultdict(float)
    for plane in ProfileData.from_file(str(path)).planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLAEigen"):   # the XLA runtime's worker threads
                for event in line.events:
                    seconds[event.name] += event.duration_ns / 1e9 / steps
    return seconds


def profile_setup(size: str, dtype: str, mode: str, steps: int, top: int,
                  tmp: pathlib.Path) -> dict:
    """The per-class and top-instruction profile of one (size, dtype, mode) train step."""
    config, batch = bench_inputs(size, dtype, mode, tmp, use_torch=False)
    side = CadenzaSide(config, batch)
    with jax.set_mesh(side.mesh):
        hlo = side.step_fn.lower(side.state, side.frozen, side.batch).compile().as_text()
    instrs = instructions(hlo)
    seconds = profile(side, steps, str(tmp / f"trace-{size}-{dtype}-{mode}"))
    known = {k: v for k, v in seconds.items() if k in instrs}
    total = sum(known.values())
    classes = dict.fromkeys(CLASSES, 0.0)
    for name, s in known.items():
        classes[op_class(name, instrs[name][1])] += s
    ops = [{"name": n, "class": op_class(n, instrs[n][1]), "shape": instrs[n][0],
            "op": instrs[n][2].split("/")[-2:], "cpu_s": s}
           for n, s in sorted(known.items(), key=lambda kv: -kv[1])[:top]]
    return {"size": size, "dtype": dtype, "mode": mode, "steps": steps, "cpu_s_per_step": total,
            "classes": classes, "top_ops": ops}


def markdown(meta: dict, results: list[dict]) -> str:
    """The profiles as a Markdown report."""
    lines = [f"# Train-step profile ({meta['device_kind']})", "",
             f"jax {meta['jax']}, commit {meta['commit']}, {meta['date']}, {meta['cpu_count']} "
             f"CPU cores, host load average {meta['load_avg_1m']:.1f} at the end (shared "
             f"machine: event times include preemption; read the shares). Batch 8 x 256, "
             f"AdamW. CPU seconds per step summed over XLA's worker threads; see the "
             f"script's docstring for the classes. The weight-gradient dots (Eigen, "
             f"asynchronous) are mostly outside the trace: the matmul share is a lower "
             f"bound.", "",
             "| size | dtype | mode | op CPU s/step | " + " | ".join(CLASSES) + " |",
             "|" + "---|" * (4 + len(CLASSES))]
    for r in results:
        t = r["cpu_s_per_step"]
        lines.append(f"| {r['size']} | {r['dtype']} | {r['mode']} | {t:.2f} | "
                     + " | ".join(f"{r['classes'][c] / t:.0%}" for c in CLASSES) + " |")
    for r in results:
        lines += ["", f"Top instructions, {r['size']} {r['dtype']} {r['mode']}:", "",
                  "| instruction | class | shape | jax op | CPU s/step |", "|---|---|---|---|---|"]
        lines += [f"| {o['name']} | {o['class']} | {o['shape']} | {'/'.join(o['op'])} | "
                  f"{o['cpu_s']:.3f} |" for o in r["top_ops"]]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setups", default="10m:float32:full",
                   help="comma-separated size:dtype:mode triples (sizes of train_throughput)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12, help="instructions listed per setup")
    p.add_argument("--name", default="train_profile", help="results file stem")
    p.add_argument("--out", default=None, help="results folder (default: bench/results/<device>)")
    args = p.parse_args()
    out, results = results_dir(__file__, args.out), []
    with tempfile.TemporaryDirectory() as tmp:
        for setup in args.setups.split(","):
            size, dtype, mode = setup.split(":")
            results.append(profile_setup(size, dtype, mode, args.steps, args.top,
                                         pathlib.Path(tmp)))
    meta = provenance()
    (out / f"{args.name}.json").write_text(json.dumps({**meta, "results": results}, indent=2)
                                           + "\n")
    (out / f"{args.name}.md").write_text(markdown(meta, results))
    print(markdown(meta, results))


if __name__ == "__main__":
    main()
