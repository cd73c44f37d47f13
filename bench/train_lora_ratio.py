"""LoRA step time / full fine-tuning step time, the two steps interleaved round by round.

    .venv/bin/python bench/train_lora_ratio.py [--size 10m] [--repeats 7] [--name train_lora_ratio]
        [--out DIR]

Both steps are ``bench/train_throughput.py``'s (same Llama weights, batch 8 x 256, AdamW,
clip 1.0, float32; LoRA rank 8, alpha 16 on q, k, v, o). Each round times one full step and
one LoRA step back to back (after one untimed step each), so both see the same machine
load; the ratio is the median of the per-round ratios, with its spread. (``train_throughput``
runs its setups one after another, so its LoRA/full line mixes loads.)

A third contender in the same rounds is the bound for any adapter method: the loss and its
gradient with respect to the input embeddings alone, every weight frozen (forward plus the
backward pass's input gradients, no weight gradient, no optimizer). LoRA / bound says how
much the adapters themselves cost; bound / full is the best ratio a LoRA step could reach
on this machine. Each contender's system CPU time and minor page faults per step are
recorded too (``getrusage``): XLA's CPU runtime allocates the compiled step's temporary
buffer (hundreds of MiB) afresh on every call, and faulting its pages in is system time.
The script keeps freed host memory mapped as the CLI does (``--host-memory``, default auto),
which removes those faults (``--host-memory release`` measures them);
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` in the environment makes glibc back such large
allocations with transparent huge pages (far fewer faults); the value in effect is written
to the results. Writes ``bench/results/<device>/<name>.{json,md}``.
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from train_throughput import CadenzaSide, bench_inputs  # a sibling script (bench/ is on sys.path)

from cadenza.models import Transformer
from cadenza.provenance import provenance, results_dir
from cadenza.runtime_env import HOST_MEMORY_CHOICES, host_memory_kept, keep_host_memory
from cadenza.train.step import token_losses

CONTENDERS = ("full", "lora", "bound")


def measured(fn) -> dict:
    """Wall seconds, system CPU seconds and minor page faults of ``fn()`` (blocked on)."""
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    jax.block_until_ready(fn())
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"s": wall, "sys_s": after.ru_stime - before.ru_stime,
            "faults": after.ru_minflt - before.ru_minflt}


def input_grad_step(side: CadenzaSide):
    """``() -> (loss, d loss / d input embeddings)`` on ``side``'s batch and current weights
    (``side`` a full fine-tuning side), compiled once; weights frozen."""
    model, cfg = Transformer(side.config.model), side.config.model

    def loss(params, batch, delta):
        emb = model.apply({"params": params}, batch["inputs"], method=Transformer.embed_tokens)
        logits = model.apply({"params": params}, embeddings=emb + delta,
                             positions=batch["positions"], segment_ids=batch["segment_ids"])[0]
        return token_losses(logits, batch["targets"], batch["loss_mask"])[0]

    delta = jnp.zeros(side.batch["inputs"].shape + (cfg.hidden_size,), cfg.dtype)
    with nn.logical_axis_rules(side.config.mesh.rules()), jax.set_mesh(side.mesh):
        fn = jax.jit(jax.value_and_grad(loss, argnums=2)).lower(
            side.state.params, side.batch, delta).compile()
    return lambda: fn(side.state.params, side.batch, delta)   # the state is donated: reread


def stats(values) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="10m")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--name", default="train_lora_ratio")
    p.add_argument("--host-memory", choices=HOST_MEMORY_CHOICES, default="auto",
                   help="as the CLI's --host-memory (keep: freed host memory stays mapped)")
    p.add_argument("--out", default=None, help="results folder (default: bench/results/<device>)")
    args = p.parse_args()
    kept = host_memory_kept(args.host_memory) and keep_host_memory()   # before JAX starts
    with tempfile.TemporaryDirectory() as tmp:
        sides = {mode: CadenzaSide(*bench_inputs(args.size, "float32", mode, pathlib.Path(tmp),
                                                 False)) for mode in ("full", "lora")}
        steps = {"full": lambda: sides["full"].train_step()["loss"],
                 "lora": lambda: sides["lora"].train_step()["loss"],
                 "bound": input_grad_step(sides["full"])}
        runs = {name: [] for name in CONTENDERS}
        for _ in range(args.repeats):
            for name in CONTENDERS:
                with jax.set_mesh(sides["lora" if name == "lora" else "full"].mesh):
                    jax.block_until_ready(steps[name]())      # untimed
                    runs[name].append(measured(steps[name]))
    times = {name: [r["s"] for r in rs] for name, rs in runs.items()}
    ratios = {f"{a}/{b}": [x / y for x, y in zip(times[a], times[b])]
              for a, b in (("lora", "full"), ("bound", "full"), ("lora", "bound"))}
    meta = provenance()
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    out = results_dir(__file__, args.out)
    (out / f"{args.name}.json").write_text(json.dumps(
        {**meta, "size": args.size, "glibc_tunables": tunables, "host_memory_kept": kept,
         "runs": runs, "step_s": times,
         "ratios": ratios}, indent=2) + "\n")
    md = (f"# LoRA step / full fine-tuning step ({meta['device']})\n\n"
          f"jax {meta['jax']}, commit {meta['commit']}, {meta['date']}, {meta['cpu_count']} CPU "
          f"cores, host load average {meta['load_avg_1m']:.1f} at the end (shared machine: "
          f"absolute times are noisy, the interleaved ratios less so). {args.size}, float32, "
          f"batch 8 x 256, AdamW, clip 1.0; LoRA rank 8 on q, k, v, o; bound = loss and "
          f"gradient w.r.t. the input embeddings only (see the script). GLIBC_TUNABLES="
          f"{tunables or '(unset)'}; freed host memory kept mapped as the CLI does "
          f"(cadenza.runtime_env.keep_host_memory): {'yes' if kept else 'no'}. Medians of "
          f"{args.repeats} interleaved rounds, "
          f"[min-max].\n\n"
          f"| size | full step s | LoRA step s | bound s | LoRA / full | bound / full | "
          f"LoRA / bound |\n|---|---|---|---|---|---|---|\n"
          f"| {args.size} | {stats(times['full'])} | {stats(times['lora'])} | "
          f"{stats(times['bound'])} | {stats(ratios['lora/full'])} | "
          f"{stats(ratios['bound/full'])} | {stats(ratios['lora/bound'])} |\n\n"
          f"Per step (medians): system CPU seconds and minor page faults (thousands; a 4 KiB "
          f"page each, unless huge pages back the buffer).\n\n"
          f"| contender | system CPU s | page faults (k) |\n|---|---|---|\n"
          + "".join(f"| {name} | {statistics.median(r['sys_s'] for r in runs[name]):.3f} | "
                    f"{statistics.median(r['faults'] for r in runs[name]) / 1000:.1f} |\n"
                    for name in CONTENDERS))
    (out / f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
