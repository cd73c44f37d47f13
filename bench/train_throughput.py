"""Train-step speed: cadenza vs a plain PyTorch loop over transformers' LlamaForCausalLM.

    .venv/bin/python bench/train_throughput.py [--sizes 10m,50m,moe10m] [--dtypes float32,bfloat16]
        [--modes full,lora] [--setups 10m:float32:full,...] [--repeats 5] [--no-torch]
        [--name train_throughput] [--override KEY=VALUE] [--out DIR]

Both sides train the same random Llama weights (cadenza's init, exported with
``cadenza.models.save_hf`` and loaded by transformers in the reference environment
``.venv-ref``, run as a subprocess with 2 threads and ``OMP_WAIT_POLICY=PASSIVE``) on the
same fixed batch (8 x 256 tokens) with the same AdamW settings and global-norm clipping at
1.0. LoRA: rank 8, alpha 16 on the attention projections (q, k, v, o) on both sides
(cadenza's ``peft.method=lora``, HF peft's ``LoraConfig``). bfloat16 means bfloat16
compute with float32 params (cadenza ``model.dtype=bfloat16``; torch ``autocast``).

The contenders are interleaved: each round times one cadenza step, its pieces, and one
torch step, so both see the same machine load; the ratio is the median of the per-round
ratios. MFU = model FLOP/s (``cadenza.train.metrics.flops_per_token``, weight gradients of
trainable params only) / the XLA matmul peak measured in the same rounds (best FLOP/s of a
2048^3 matmul in the compute dtype); torch's own matmul peak is reported alongside.

Breakdown (median seconds per step; each piece is its own program, timed alone in every
round, so the pieces need not add up to the fused step):
  cadenza: forward = the model to logits; loss = cross-entropy forward + backward on those
  logits alone; backward = (value and grad of the loss) - forward - loss, per round;
  optimizer = clipping, AdamW and the update on fixed gradients (its own jitted program,
  params and optimizer state donated as in the step, on fresh copies made before timing);
  host/data = making the batch and putting it on the device.
  torch: each phase timed in its loop (forward, loss forward, backward, clip + step +
  zero_grad, making the batch tensors); torch's loss backward sits in its backward row.

Host memory: cadenza's side keeps freed host memory mapped as the ``cadenza`` CLI does
(``--host-memory``, default auto: kept on a CPU-only machine; see
``cadenza.runtime_env.keep_host_memory``), so the temporary buffer XLA's CPU runtime
allocates for every call of the compiled step stops faulting its pages in. The torch loop
runs with glibc's defaults unless ``--torch-host-memory keep`` gives it the same malloc
settings (as ``GLIBC_TUNABLES``). Both choices and any ``GLIBC_TUNABLES`` of the
environment (``glibc.malloc.hugetlb=1``: transparent huge pages) are written to the results.
Writes ``bench/results/<device>/train_throughput.{json,md}``.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cadenza.config import load_config
from cadenza.models import init_params, save_hf, save_model
from cadenza.provenance import provenance, results_dir
from cadenza.runtime_env import (
    HOST_MEMORY_CHOICES,
    host_memory_kept,
    keep_host_memory,
    keep_host_memory_tunables,
)
from cadenza.train.mesh import batch_sharding, make_mesh, replicated
from cadenza.train.metrics import flops_per_token
from cadenza.train.optim import make_optimizer, make_schedule
from cadenza.train.state import init_state, state_shardings
from cadenza.train.step import make_train_step, token_losses
from cadenza.train.trainer import default_task

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZES = {   # Llama-style, untied embeddings, MHA
    "10m": ["model.vocab_size=8192", "model.hidden_size=320", "model.num_layers=6",
            "model.num_heads=5", "model.num_kv_heads=5", "model.intermediate_size=864"],
    "50m": ["model.vocab_size=16384", "model.hidden_size=512", "model.num_layers=8",
            "model.num_heads=8", "model.num_kv_heads=8", "model.intermediate_size=1376"],
    # ~1.1B (GQA): for accelerators (scripts/gpu_check.sh runs it with --no-torch)
    # the 10m shape as a Mixtral-style mixture of experts (8 experts of width 432, top-2):
    # cadenza alone (--no-torch; the torch side runs Llama only)
    "moe10m": ["model.family=mixtral", "model.norm_topk_prob=true", "model.vocab_size=8192",
               "model.hidden_size=320", "model.num_layers=6", "model.num_heads=5",
               "model.num_kv_heads=5", "model.intermediate_size=432", "model.num_experts=8",
               "model.num_experts_per_tok=2"],
    "1b": ["model.vocab_size=32000", "model.hidden_size=2048", "model.num_layers=16",
           "model.num_heads=32", "model.num_kv_heads=8", "model.intermediate_size=8192"],
}
BATCH, SEQ, LR = 8, 256, 1e-4
TRAIN = [f"train.batch_size={BATCH}", f"train.seq_len={SEQ}", f"train.learning_rate={LR}",
         "train.warmup_steps=0", "train.schedule=constant", "train.optimizer=adamw",
         "train.weight_decay=0.01", "train.grad_clip_norm=1.0", "mesh.data=-1"]
LORA = ["peft.method=lora", "peft.rank=8", "peft.alpha=16"]

TORCH_RUNNER = r"""
import json, sys, time
import torch
from transformers import LlamaForCausalLM
spec = json.loads(sys.argv[1])
torch.manual_seed(0)
model = LlamaForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32,
                                         local_files_only=True, trust_remote_code=False)
model.config.use_cache = False
if spec["lora"]:
    from peft import LoraConfig, get_peft_model
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=targets))
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
bf16 = spec["dtype"] == "bfloat16"
inputs_np, targets_np = spec["inputs"], spec["targets"]
a = torch.ones(2048, 2048)

def matmul_peak():
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter(); a @ a; best = min(best, time.perf_counter() - t)
    return 2 * 2048 ** 3 / best

def step():
    t = {}
    t0 = time.perf_counter()
    inputs, targets = torch.tensor(inputs_np), torch.tensor(targets_np)
    t1 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=inputs).logits
    t2 = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                             targets.view(-1))
    t3 = time.perf_counter()
    loss.backward()
    t4 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t5 = time.perf_counter()
    return {"step": t5 - t0, "host/data": t1 - t0, "forward": t2 - t1, "loss": t3 - t2,
            "backward": t4 - t3, "optimizer": t5 - t4, "loss_value": float(loss)}

step()                                   # warm-up
print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:
    out = step()
    out["matmul_peak"] = matmul_peak()
    print(json.dumps(out), flush=True)
"""


class TorchSide:
    """The PyTorch loop as a subprocess that runs one timed step per request."""

    def __init__(self, spec: dict, keep_host_memory: bool = False):
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="2",
                   MKL_NUM_THREADS="2")
        if keep_host_memory:
            env["GLIBC_TUNABLES"] = ":".join(
                t for t in (env.get("GLIBC_TUNABLES"), keep_host_memory_tunables()) if t)
        self.proc = subprocess.Popen(
            [str(ROOT / ".venv-ref" / "bin" / "python"), "-c", TORCH_RUNNER, json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch runner exited ({self.proc.wait()})")
        return json.loads(line)

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def timed(fn, *args):
    """Seconds of ``fn(*args)`` until its outputs are ready, and its outputs."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, out


class CadenzaSide:
    """The jitted train step of ``config`` plus the pieces its breakdown times."""

    def __init__(self, config, batch_np: dict):
        self.config = config
        self.mesh, rules = make_mesh(config.mesh, jax.devices()), config.mesh.rules()
        self.task, opt = default_task(config), make_optimizer(config.train)
        shardings = state_shardings(self.task, opt, self.mesh, rules)
        self.frozen = self.task.load_frozen(self.mesh, rules)
        self.state = init_state(self.task, opt, 0, self.mesh, rules, shardings)
        self.rows = batch_sharding(self.mesh, rules)
        frozen_sh = jax.tree.map(lambda a: a.sharding, self.frozen)
        self.step_fn = make_train_step(
            self.task, opt, make_schedule(config.train), microbatches=1, z_loss=0.0,
            rules=rules, state_shardings=shardings, frozen_shardings=frozen_sh,
            batch_sharding=self.rows, metric_sharding=replicated(self.mesh))
        self.batch_np = batch_np
        self.batch = self.put_batch()
        task = self.task

        def loss(trainable, frozen, batch):
            return token_losses(task.apply(trainable, frozen, batch, None), batch["targets"],
                                batch["loss_mask"])[0]

        def ce(logits, batch):
            return token_losses(logits, batch["targets"], batch["loss_mask"])[0]

        with nn.logical_axis_rules(rules), jax.set_mesh(self.mesh):
            self.forward = jax.jit(lambda t, f, b: task.apply(t, f, b, None)).lower(
                self.state.params, self.frozen, self.batch).compile()
            self.grad = jax.jit(jax.value_and_grad(loss)).lower(
                self.state.params, self.frozen, self.batch).compile()
        def update(params, opt_state, grads):
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        with jax.set_mesh(self.mesh):
            self.grads = jax.tree.map(jnp.ones_like, self.state.params)
            self.update = jax.jit(update, donate_argnums=(0, 1)).lower(
                self.state.params, self.state.opt_state, self.grads).compile()
        logits = jnp.zeros((BATCH, SEQ, config.model.vocab_size), jnp.float32)
        self.ce = jax.jit(jax.value_and_grad(ce)).lower(logits, self.batch).compile()
        self.logits = logits
        n = 2048
        self.mm_in = jnp.ones((n, n), config.model.dtype)
        self.mm = jax.jit(lambda x: x @ x).lower(self.mm_in).compile()
        with jax.set_mesh(self.mesh):
            self.compile_s, _ = timed(self.train_step)

    def put_batch(self) -> dict:
        return {k: jax.device_put(v, self.rows) for k, v in self.batch_np.items()}

    def train_step(self):
        self.state, metrics = self.step_fn(self.state, self.frozen, self.batch)
        return metrics

    def round(self) -> dict:
        """One timed step and one timing of each piece (seconds), plus the matmul peak."""
        with jax.set_mesh(self.mesh):
            step_s, metrics = timed(self.train_step)
            fwd_s, _ = timed(self.forward, self.state.params, self.frozen, self.batch)
            grad_s, _ = timed(self.grad, self.state.params, self.frozen, self.batch)
            fresh = jax.block_until_ready(jax.tree.map(
                jnp.copy, (self.state.params, self.state.opt_state)))
            opt_s, _ = timed(self.update, *fresh, self.grads)
        ce_s, _ = timed(self.ce, self.logits, self.batch)
        data_s, _ = timed(self.put_batch)
        mm = min(timed(self.mm, self.mm_in)[0] for _ in range(3))
        return {"step": step_s, "forward": fwd_s, "loss": ce_s,
                "backward": grad_s - fwd_s - ce_s, "optimizer": opt_s,
                "host/data": data_s, "matmul_peak": 2 * 2048 ** 3 / mm,
                "loss_value": float(metrics["loss"])}


def median_spread(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_inputs(size: str, dtype: str, mode: str, tmp: pathlib.Path, use_torch: bool,
                 overrides: tuple[str, ...] = ()) -> tuple:
    """``(config, batch)`` of one (size, dtype, mode): the fixed random batch (numpy) and the
    config that starts from the shared random weights saved under ``tmp`` (with the HF
    export for the torch side when ``use_torch``)."""
    base = load_config(None, SIZES[size] + TRAIN, preset="tiny")
    if use_torch and base.model.is_moe:
        raise SystemExit(f"size {size} is a mixture of experts: the torch side runs Llama "
                         f"only; add --no-torch")
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, base.model.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((BATCH, SEQ), np.float32),
             "segment_ids": np.ones((BATCH, SEQ), np.int32),
             "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy()}
    model_dir, hf_dir = tmp / f"{size}-model", tmp / f"{size}-hf"
    if not model_dir.exists():
        params = init_params(base.model, jax.random.key(0))
        save_model(model_dir, base, params)
    if use_torch and not hf_dir.exists():
        save_hf(model_dir, hf_dir)
    extra = [f"model.dtype={dtype}", f"train.init_from={model_dir}", *overrides]
    config = load_config(None, SIZES[size] + TRAIN + extra + (LORA if mode == "lora" else []),
                         preset="tiny")
    return config, batch


def bench_setup(size: str, dtype: str, mode: str, repeats: int, use_torch: bool,
                tmp: pathlib.Path, overrides: tuple[str, ...] = (),
                torch_keeps_host_memory: bool = False) -> dict:
    """Interleaved rounds of cadenza and torch for one (size, dtype, mode); ``overrides``:
    more config overrides for cadenza (e.g. ``model.attention_impl=xla``);
    ``torch_keeps_host_memory``: the torch loop gets cadenza's malloc settings."""
    config, batch = bench_inputs(size, dtype, mode, tmp, use_torch, overrides)
    hf_dir = tmp / f"{size}-hf"
    cad = CadenzaSide(config, batch)
    torch = TorchSide({"hf_dir": str(hf_dir), "dtype": dtype, "lora": mode == "lora", "lr": LR,
                       "inputs": batch["inputs"].tolist(),
                       "targets": batch["targets"].tolist()},
                      torch_keeps_host_memory) if use_torch else None
    rounds = []
    try:
        for _ in range(repeats):
            rounds.append({"cadenza": cad.round(), "torch": torch.step() if torch else None})
    finally:
        if torch:
            torch.close()
    tokens_per_step = BATCH * SEQ
    trainable = None if mode == "full" else cad.task.trainable_params
    flops = flops_per_token(config.model, SEQ, trainable) * tokens_per_step
    out = {"size": size, "dtype": dtype, "mode": mode, "params": config.model.num_params(),
           "trainable_params": cad.task.trainable_params, "model_gflop_per_step": flops / 1e9,
           "compile_s": cad.compile_s, "rounds": rounds}
    for side in ("cadenza", "torch") if torch else ("cadenza",):
        rs = [r[side] for r in rounds]
        step = statistics.median(r["step"] for r in rs)
        peak = statistics.median(r["matmul_peak"] for r in rs)
        out[side] = {"step_s": median_spread([r["step"] for r in rs]),
                     "tokens_per_s": tokens_per_step / step,
                     "matmul_peak_gflops": peak / 1e9,
                     "mfu_vs_own_peak": statistics.median(flops / r["step"] / r["matmul_peak"]
                                                          for r in rs),
                     "breakdown_s": {k: statistics.median(r[k] for r in rs) for k in PHASES},
                     "first_loss": rs[0]["loss_value"], "last_loss": rs[-1]["loss_value"]}
    c = out["cadenza"]
    c["mfu_vs_xla_peak"] = c["mfu_vs_own_peak"]
    if torch:
        ratios = [r["torch"]["step"] / r["cadenza"]["step"] for r in rounds]
        out["speedup_vs_torch"] = median_spread(ratios)
        out["torch"]["threads"] = torch.info["threads"]
        out["torch"]["mfu_vs_xla_peak"] = statistics.median(
            flops / r["torch"]["step"] / r["cadenza"]["matmul_peak"] for r in rounds)
    return out


PHASES = ("forward", "loss", "backward", "optimizer", "host/data")


def host_memory_note(meta: dict) -> str:
    """Which sides kept freed host memory mapped, for a results header."""
    kept = meta.get("host_memory_kept") or {}
    return ", ".join(f"{side} {'yes' if kept.get(side) else 'no'}" for side in ("cadenza", "torch"))


def markdown(meta: dict, results: list[dict]) -> str:
    """The results as a Markdown report."""
    lines = [f"# Train-step speed: cadenza vs a PyTorch loop ({meta['device_kind']})", "",
             f"jax {meta['jax']}, commit {meta['commit']}, {meta['date']}, "
             f"{meta['cpu_count']} CPU cores, host load average {meta['load_avg_1m']:.1f} at the "
             f"end (other jobs share this machine: absolute numbers are noisy, the interleaved "
             f"ratios less so). Batch {BATCH} x {SEQ}, AdamW, clip 1.0; torch: "
             f"transformers' LlamaForCausalLM, 2 threads, OMP_WAIT_POLICY=PASSIVE. "
             f"The environment's GLIBC_TUNABLES={meta.get('glibc_tunables') or '(unset)'} "
             f"(inherited by both sides). "
             f"Freed host memory kept mapped (cadenza.runtime_env.keep_host_memory): "
             f"{host_memory_note(meta)}. "
             f"Medians of {len(results[0]['rounds'])} interleaved rounds, [min-max].", "",
             "| size | dtype | mode | cadenza tok/s | torch tok/s | cadenza / torch speed | "
             "cadenza MFU (XLA peak) | torch MFU (XLA peak) | torch MFU (own peak) | "
             "XLA / torch matmul GFLOP/s |", "|" + "---|" * 10]
    for r in results:
        c, t = r["cadenza"], r.get("torch")
        sp = r.get("speedup_vs_torch")
        lines.append(
            f"| {r['size']} ({r['params'] / 1e6:.1f}M) | {r['dtype']} | {r['mode']} | "
            f"{c['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | "
            f"{sp['median']:.2f}x [{sp['min']:.2f}-{sp['max']:.2f}] | {c['mfu_vs_xla_peak']:.0%} | "
            f"{t['mfu_vs_xla_peak']:.0%} | {t['mfu_vs_own_peak']:.0%} | "
            f"{c['matmul_peak_gflops']:.0f} / {t['matmul_peak_gflops']:.0f} |" if t else
            f"| {r['size']} ({r['params'] / 1e6:.1f}M) | {r['dtype']} | {r['mode']} | "
            f"{c['tokens_per_s']:.0f} | - | - | {c['mfu_vs_xla_peak']:.0%} | - | - | "
            f"{c['matmul_peak_gflops']:.0f} / - |")
    lines += ["", "LoRA step time / full fine-tuning step time (cadenza, same size and dtype):", ""]
    full = {(r["size"], r["dtype"]): r for r in results if r["mode"] == "full"}
    for r in results:
        f = full.get((r["size"], r["dtype"]))
        if r["mode"] == "lora" and f:
            ratio = r["cadenza"]["step_s"]["median"] / f["cadenza"]["step_s"]["median"]
            lines.append(f"- {r['size']} {r['dtype']}: {ratio:.2f}")
    lines += ["", "Breakdown, median seconds per step (see the script's docstring for what "
              "each row holds):", "",
              "| size | dtype | mode | side | step | " + " | ".join(PHASES) + " |",
              "|" + "---|" * (5 + len(PHASES))]
    for r in results:
        for side in ("cadenza", "torch"):
            if r.get(side):
                b = r[side]["breakdown_s"]
                lines.append(f"| {r['size']} | {r['dtype']} | {r['mode']} | {side} | "
                             f"{r[side]['step_s']['median']:.3f} | "
                             + " | ".join(f"{b[k]:.3f}" for k in PHASES) + " |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10m,50m")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--setups", default=None,
                   help="comma-separated size:dtype:mode triples instead of the full product")
    p.add_argument("--no-torch", action="store_true", help="time cadenza alone")
    p.add_argument("--name", default="train_throughput", help="results file stem")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra cadenza config override, e.g. model.attention_impl=xla")
    p.add_argument("--host-memory", choices=HOST_MEMORY_CHOICES, default="auto",
                   help="cadenza's side: as the CLI's --host-memory")
    p.add_argument("--torch-host-memory", choices=("keep", "release"), default="release",
                   help="keep: the torch loop gets the same malloc settings (GLIBC_TUNABLES)")
    p.add_argument("--out", default=None, help="results folder (default: bench/results/<device>)")
    args = p.parse_args()
    kept = host_memory_kept(args.host_memory) and keep_host_memory()   # before JAX starts
    setups = ([tuple(s.split(":")) for s in args.setups.split(",")] if args.setups else
              [(s, d, m) for s in args.sizes.split(",") for d in args.dtypes.split(",")
               for m in args.modes.split(",")])
    results = []
    out = results_dir(__file__, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        for size, dtype, mode in setups:
            r = bench_setup(size, dtype, mode, args.repeats, not args.no_torch,
                            pathlib.Path(tmp), tuple(args.override),
                            args.torch_host_memory == "keep")
            print(json.dumps({k: v for k, v in r.items() if k != "rounds"}), flush=True)
            results.append(r)
            # written after every setup: a cut-short run keeps its rows
            meta = {**provenance(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                    "host_memory_kept": {"cadenza": kept,
                                         "torch": args.torch_host_memory == "keep"}}
            (out / f"{args.name}.json").write_text(
                json.dumps({**meta, "results": results}, indent=2) + "\n")
            (out / f"{args.name}.md").write_text(markdown(meta, results))
    print(markdown(meta, results))


if __name__ == "__main__":
    main()
