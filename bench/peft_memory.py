"""LoRA vs full fine-tuning: train-step time and compiled memory on the same config.

Usage: .venv/bin/python bench/peft_memory.py [--steps N] [--layers L] [--hidden D]
Writes bench/results/<device>/peft_memory.{json,md}. Memory comes from the
compiled step's ``memory_analysis()`` (argument, output, temp and alias
bytes; peak ~= argument + output + temp - alias); the optimizer is AdamW, the
step is jitted with the trainable params and optimizer state donated.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax

from cadenza.config import load_config
from cadenza.models import init_params
from cadenza.provenance import provenance, results_dir
from cadenza.train import peft


def measure(method, args):
    model = [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
             f"model.intermediate_size={4 * args.hidden}", "model.num_heads=4",
             "model.num_kv_heads=4", "model.vocab_size=4096"]
    lora = ["peft.targets=.*_proj", "peft.rank=8"] if method != "none" else []
    cfg = load_config(None, [f"peft.method={method}", *lora, *model], preset="tiny")
    params = init_params(cfg.model, jax.random.key(0))
    pm, trainable, frozen = peft.prepare(cfg, params, jax.random.key(1))
    tx = pm.optimizer(optax.adamw(1e-3))
    opt_state = tx.init(trainable)
    tokens = jax.random.randint(jax.random.key(2), (args.batch, args.seq + 1), 0,
                                cfg.model.vocab_size)

    def loss_fn(t, f, x, y):
        logp = jax.nn.log_softmax(pm.apply(t, f, x)[0])
        return -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1))

    def step(t, o, f, x, y):
        loss, g = jax.value_and_grad(loss_fn)(t, f, x, y)
        u, o = tx.update(g, o, t)
        return optax.apply_updates(t, u), o, loss

    x, y = tokens[:, :-1], tokens[:, 1:]
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(trainable, opt_state, frozen, x,
                                                          y).compile()
    mem = compiled.memory_analysis()
    trainable, opt_state, loss = compiled(trainable, opt_state, frozen, x, y)
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainable, opt_state, loss = compiled(trainable, opt_state, frozen, x, y)
    jax.block_until_ready(loss)
    dt = (time.perf_counter() - t0) / args.steps
    summary = pm.summary(trainable, frozen)
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes")
    m = {f: int(getattr(mem, f)) for f in fields}
    m["peak_bytes_estimate"] = (m["argument_size_in_bytes"] + m["output_size_in_bytes"]
                                + m["temp_size_in_bytes"] - m["alias_size_in_bytes"])
    return {"method": method, "step_time_s": dt, "total_params": summary["total_params"],
            "trainable_params": summary["trainable_params"],
            "optimizer_state_bytes": sum(a.nbytes for a in jax.tree.leaves(opt_state)), **m}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()
    rows = [measure(m, args) for m in ("none", "lora")]
    meta = {**provenance(), "config": vars(args)}
    commit = meta["commit"]
    out = results_dir(__file__)
    (out / "peft_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    mib = 1 << 20
    lines = [f"# LoRA vs full fine-tuning ({meta['device_kind']}, jax {meta['jax']}, "
             f"commit {commit}, {meta['date'][:10]})", "",
             f"Config: {args.layers} layers, hidden {args.hidden}, batch {args.batch} x "
             f"{args.seq}, AdamW, float32; LoRA r=8 on all projections.", "",
             "| method | trainable / total params | step time (s) | optimizer state (MiB) "
             "| args (MiB) | temps (MiB) | peak est. (MiB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "full fine-tuning" if r["method"] == "none" else r["method"]
        lines.append(f"| {name} | {r['trainable_params']:,} / {r['total_params']:,} | "
                     f"{r['step_time_s']:.3f} | {r['optimizer_state_bytes'] / mib:.1f} | "
                     f"{r['argument_size_in_bytes'] / mib:.1f} | "
                     f"{r['temp_size_in_bytes'] / mib:.1f} | "
                     f"{r['peak_bytes_estimate'] / mib:.1f} |")
    (out / "peft_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
