"""Train-step throughput and MFU: steps/s, tokens/s, MFU for the tiny preset and a
~100M-parameter Llama-style config, on whatever devices JAX sees.

    .venv/bin/python bench/train_throughput.py [--steps N] [--big-steps N] [--only NAME]
        [--lora-rank R]

``--only 1b`` (~1.1B params, bf16 compute, batch 8 x 2048) is for accelerators
(scripts/gpu_check.py runs it). ``--lora-rank R`` times a LoRA step instead (adapters
of rank R on the default targets, the random-init base saved to a temporary model
directory and loaded frozen, as ``fit`` does); its MFU counts the frozen base's forward
and activation-gradient FLOPs but weight gradients only for the adapters, and its
results go to ``train_throughput_lora.*``.

Times the jitted, donated train step alone (AdamW, global-norm clipping, synthetic
batches already on device), after a warm-up step that compiles. MFU = achieved model
FLOP/s (``cadenza.train.metrics.flops_per_token``) / peak FLOP/s. The peak is the
device's table entry (``cadenza.train.metrics.PEAK_FLOPS``) or, on CPU where there is
none, a measured one: the best FLOP/s of a large square matmul in the compute dtype on
the same device, so CPU "MFU" means "fraction of this CPU's own matmul speed".
Writes JSON + Markdown to ``bench/results/<device>/train_throughput.*``.
"""

import argparse
import json
import pathlib
import platform
import tempfile
import time

import jax
import jax.numpy as jnp

from cadenza.config import load_config
from cadenza.models import init_params, save_model
from cadenza.provenance import provenance, results_dir
from cadenza.train.mesh import batch_sharding, make_mesh, replicated, validate_sharding
from cadenza.train.metrics import flops_per_token, peak_flops_per_device
from cadenza.train.optim import make_optimizer, make_schedule
from cadenza.train.state import init_state, state_shardings
from cadenza.train.step import make_train_step
from cadenza.train.synthetic import SyntheticBatches
from cadenza.train.task import full_model_task

CONFIGS = {
    "tiny": ["model.preset=tiny", "train.batch_size=8", "train.seq_len=256"],
    "100m": ["model.vocab_size=32000", "model.hidden_size=768", "model.num_layers=8",
             "model.num_heads=12", "model.num_kv_heads=12", "model.intermediate_size=2048",
             "model.dtype=bfloat16", "train.batch_size=4", "train.seq_len=256"],
    "1b": ["model.vocab_size=32000", "model.hidden_size=2048", "model.num_layers=16",
           "model.num_heads=32", "model.num_kv_heads=8", "model.intermediate_size=8192",
           "model.dtype=bfloat16", "train.batch_size=8", "train.seq_len=2048"],
}


def measured_matmul_flops(dtype: str, n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` on the default device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def bench(name: str, steps: int, lora_rank: int = 0, extra: tuple[str, ...] = ()) -> dict:
    """One config's row; ``extra``: more config overrides (``model.attention_impl=xla``)."""
    overrides = CONFIGS[name] + ["train.warmup_steps=1", "mesh.data=-1", *extra]
    with tempfile.TemporaryDirectory() as tmp:
        if lora_rank:   # the frozen base is read from a model directory, as fit does
            base = load_config(None, overrides, preset="tiny")
            base_dir = save_model(pathlib.Path(tmp) / "base", base,
                                  init_params(base.model, jax.random.key(0)))
            overrides += ["peft.method=lora", f"peft.rank={lora_rank}",
                          f"train.init_from={base_dir}"]
        row = _bench(name, steps, load_config(None, overrides, preset="tiny"), lora_rank)
        return {**row, "overrides": list(extra)}


def _bench(name: str, steps: int, config, lora_rank: int) -> dict:
    devices = jax.devices()
    validate_sharding(config, len(devices))
    mesh, rules = make_mesh(config.mesh, devices), config.mesh.rules()
    if lora_rank:
        from cadenza.train.peft.task import peft_task

        task = peft_task(config)
    else:
        task = full_model_task(config.model)
    opt = make_optimizer(config.train)
    shardings = state_shardings(task, opt, mesh, rules)
    state = init_state(task, opt, 0, mesh, rules, shardings)
    frozen = task.load_frozen(mesh, rules)
    rows = batch_sharding(mesh, rules)
    step = make_train_step(task, opt, make_schedule(config.train), microbatches=1,
                           z_loss=0.0, rules=rules, state_shardings=shardings,
                           frozen_shardings=jax.tree.map(lambda a: a.sharding, frozen),
                           batch_sharding=rows, metric_sharding=replicated(mesh))
    trainable = sum(x.size for x in jax.tree.leaves(state.params))
    t = config.train
    batch = {k: jax.device_put(v, rows) for k, v in
             next(SyntheticBatches(t.batch_size, t.seq_len, config.model.vocab_size)).items()}
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        state, m = step(state, frozen, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, frozen, batch)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t0) / steps
    tokens = t.batch_size * t.seq_len
    flops = flops_per_token(config.model, t.seq_len,
                            trainable_params=trainable if lora_rank else None) * tokens / dt
    peak = peak_flops_per_device(devices[0])
    peak_source = "table"
    if peak is None:
        peak, peak_source = measured_matmul_flops(config.model.dtype), "measured matmul"
    return {"config": name, "method": f"lora r{lora_rank}" if lora_rank else "full",
            "params": config.model.num_params(), "trainable_params": trainable,
            "dtype": config.model.dtype,
            "batch_size": t.batch_size, "seq_len": t.seq_len, "timed_steps": steps,
            "compile_s": round(compile_s, 2), "step_time_s": dt, "steps_per_s": 1 / dt,
            "tokens_per_s": tokens / dt, "model_tflops_per_s": flops / 1e12,
            "peak_tflops_per_device": peak / 1e12, "peak_source": peak_source,
            "mfu": flops / (peak * len(devices)), "final_loss": float(m["loss"])}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps for the tiny config")
    p.add_argument("--big-steps", type=int, default=3, help="timed steps for the 100M config")
    p.add_argument("--only", choices=sorted(CONFIGS))
    p.add_argument("--lora-rank", type=int, default=0, help="time LoRA of this rank (0: full)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override, e.g. model.attention_impl=xla")
    p.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = p.parse_args()
    dev = jax.devices()[0]
    names = [args.only] if args.only else [n for n in CONFIGS if n != "1b"]
    results = [bench(n, args.steps if n == "tiny" else args.big_steps, args.lora_rank,
                     tuple(args.override)) for n in names]
    meta = provenance()
    meta["device"] = f"{dev.device_kind} ({platform.processor() or platform.machine()})"
    commit = meta["commit"]
    out = results_dir(__file__, args.out)
    stem = "train_throughput_lora" if args.lora_rank else "train_throughput"
    (out / f"{stem}.json").write_text(json.dumps({**meta, "results": results},
                                                          indent=2) + "\n")
    lines = [f"# Train-step throughput ({meta['device']}, {meta['num_devices']} device(s))", "",
             f"jax {meta['jax']}, commit {commit}, {meta['date']}, host load average "
             f"{meta['load_avg_1m']:.1f}. AdamW, donated state, "
             "synthetic batches on device; MFU against the peak shown.", "",
             "| config | method | params | dtype | batch x seq | step (s) | steps/s | tokens/s | "
             "model TFLOP/s | peak TFLOP/s | MFU |", "|" + "---|" * 11]
    for r in results:
        lines.append(f"| {r['config']} | {r['method']} | {r['params'] / 1e6:.1f}M | "
                     f"{r['dtype']} | "
                     f"{r['batch_size']}x{r['seq_len']} | {r['step_time_s']:.3f} | "
                     f"{r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['model_tflops_per_s']:.3f} | {r['peak_tflops_per_device']:.3f} "
                     f"({r['peak_source']}) | {r['mfu']:.1%} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
