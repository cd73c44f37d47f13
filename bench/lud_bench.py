"""Lexical Unit Decoding vs greedy decoding of the same LUD-fine-tuned tiny model (CPU).

Run: ``.venv/bin/python bench/lud_bench.py [--base-steps 400] [--lud-steps 200]``.

1. Base model: the ``tiny`` preset trained with ``cadenza.train.fit`` on plain rows of the
   byte-level stdlib corpus (ids = byte + 3).
2. LUD: the base model marks units (alpha, k from ``configs/experiments/tiny_lud.yaml``)
   and is fine-tuned on the placeholder rows (``finetune_lud``).
3. Held-out prompts: windows of stdlib modules not in the training set. In one run it
   times, after a warm-up compile of each: greedy decoding (the LUD loop with
   ``lookahead=0``, i.e. one token per model call through the same code) and LUD at
   several beta (same compiled function; beta is traced).

Quality: per-token NLL of each generation under the base model and under the LUD model
(teacher forcing, generated tokens only; lower = the output is more typical), exact
agreement with the greedy output (position-wise), and match rate against the held-out
reference continuation. Also the LM loss of base and LUD model on held-out real tokens
(the fine-tune's cost on ordinary next-token prediction). Results:
``bench/results/cpu/lud_bench.{json,md}``.
"""

import argparse
import dataclasses
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from cadenza.config import load_config
from cadenza.decode import DecodeConfig, generate
from cadenza.models import Transformer, load_model
from cadenza.provenance import provenance, results_dir
from cadenza.train import fit
from cadenza.train.lud_data import RowIterator, lm_rows, stdlib_byte_tokens
from cadenza.train.lud_task import finetune_lud

HELD_OUT = ("calendar.py", "pprint.py", "reprlib.py")


def nll_fn(cfg):
    """jitted (params, seqs [B, L], start) -> mean NLL per row of tokens seqs[:, start:]."""
    model = Transformer(cfg)

    @jax.jit
    def run(params, seqs, start):
        logits, _, _ = model.apply({"params": params}, seqs[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        tok = jnp.take_along_axis(logp, seqs[:, 1:, None], axis=-1)[..., 0]
        mask = (jnp.arange(seqs.shape[1] - 1) >= start - 1)[None]
        return -(tok * mask).sum(axis=1) / mask.sum()

    return run


def timed(fn, reps: int):
    """(fastest wall time, fastest process CPU time, output) of ``reps`` runs after a warm-up
    compile. On a shared, loaded host wall time mostly measures the other processes; the
    process CPU time (all threads) is the steadier estimate of the run's own cost."""
    jax.block_until_ready(fn())  # warm-up / compile
    wall, cpu, out = [], [], None
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(fn())
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return float(np.min(wall)), float(np.min(cpu)), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-steps", type=int, default=400)
    ap.add_argument("--lud-steps", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--betas", default="0.6,0.8,0.9,0.95")
    args = ap.parse_args()

    tokens = stdlib_byte_tokens()
    held = stdlib_byte_tokens(HELD_OUT)
    common = ["train.progress_bar=false", "train.tensorboard=false", "mesh.data=1",
              "train.checkpoint_every=0"]
    devices = jax.devices()[:1]
    with tempfile.TemporaryDirectory() as tmp:
        base_cfg = load_config("tiny_lud", common + [
            f"train.output_dir={tmp}/base", f"train.steps={args.base_steps}",
            "train.learning_rate=3e-3", "train.warmup_steps=20"])
        rows, _ = lm_rows(tokens, base_cfg.train.seq_len)
        t = time.perf_counter()
        base_summary = fit(base_cfg, data=RowIterator(rows, base_cfg.train.batch_size),
                           devices=devices)
        base_s = time.perf_counter() - t
        _, base_params = load_model(base_summary["model_dir"])
        cfg = load_config("tiny_lud", common + [f"train.output_dir={tmp}/lud",
                                                f"train.steps={args.lud_steps}"])
        t = time.perf_counter()
        lud_summary, params, stats = finetune_lud(cfg, base_params, tokens, devices=devices)
        lud_s = time.perf_counter() - t

    mc = cfg.model
    rng = np.random.default_rng(0)
    span = args.prompt_len + args.new_tokens
    starts = rng.integers(0, len(held) - span, size=args.prompts)
    windows = np.stack([held[s:s + span] for s in starts])
    prompts = [list(w[:args.prompt_len]) for w in windows]
    reference = windows[:, args.prompt_len:]
    nll = nll_fn(mc)
    lm_loss = {name: float(nll(p, jnp.asarray(windows), 1).mean())
               for name, p in (("base", base_params), ("lud", params))}

    decode = DecodeConfig(method="lud", max_new_tokens=args.new_tokens, ignore_eos=True)

    def run(lud, p=params):
        return generate(Transformer(mc), p, prompts, decode, lud=lud)

    def quality(out, greedy_tokens):
        gen = np.asarray(out.token_ids)
        seqs = jnp.asarray(np.concatenate([np.asarray(prompts), gen], axis=1))
        return {"nll_lud_model": float(nll(params, seqs, args.prompt_len).mean()),
                "nll_base_model": float(nll(base_params, seqs, args.prompt_len).mean()),
                "agree_with_greedy": float((gen == greedy_tokens).mean()),
                "match_reference": float((gen == reference).mean())}

    total = args.prompts * args.new_tokens
    rows_out = []
    greedy_lud = dataclasses.replace(cfg.lud, lookahead=0)
    g_wall, g_cpu, g_out = timed(lambda: run(greedy_lud), args.reps)
    greedy_tokens = np.asarray(g_out.token_ids)

    def record(method, beta, wall, cpu, out):
        rows_out.append({"method": method, "beta": beta, "wall_s": wall, "cpu_s": cpu,
                         "tokens_per_s": total / wall, "tokens_per_cpu_s": total / cpu,
                         "tokens_per_step": out.stats["tokens_per_step"],
                         "cpu_ms_per_step": 1e3 * cpu / int(np.max(out.extras["steps"])),
                         "speedup_wall": g_wall / wall, "speedup_cpu": g_cpu / cpu,
                         **quality(out, greedy_tokens)})

    record("greedy (LUD model)", None, g_wall, g_cpu, g_out)
    record("greedy (base model)", None, *timed(lambda: run(greedy_lud, base_params), args.reps))
    for beta in (float(b) for b in args.betas.split(",")):
        for cut in (True, False):
            lud = dataclasses.replace(cfg.lud, beta=beta, cut_repeats=cut)
            record(f"LUD m={lud.lookahead} cut_repeats={cut}", beta,
                   *timed(lambda lud=lud: run(lud), args.reps))

    result = {
        **provenance(),
        "settings": {**vars(args), "lud": dataclasses.asdict(cfg.lud),
                     "seq_len": cfg.train.seq_len, "batch_size": cfg.train.batch_size},
        "training": {"base_loss": base_summary["loss"], "base_seconds": base_s,
                     "lud_loss": lud_summary["loss"], "lud_seconds": lud_s, "rows": stats},
        "held_out_lm_loss": lm_loss, "results": rows_out,
    }
    commit = result["commit"]
    out_dir = results_dir(__file__)
    (out_dir / "lud_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# LUD vs greedy decoding ({result['device']}, {result['device_kind']}, jax "
        f"{result['jax']}, commit {commit}, {result['date']})", "",
        f"Tiny preset, byte-level stdlib code; base: {args.base_steps} steps (loss "
        f"{base_summary['loss']:.3f}); LUD fine-tune: {args.lud_steps} steps (loss "
        f"{lud_summary['loss']:.3f}, real + placeholder CE). alpha={cfg.lud.alpha}, "
        f"k={cfg.lud.max_unit}, marking={cfg.lud.marking}. Rows: {stats}.", "",
        f"Held-out LM loss (nats/byte, real tokens): base {lm_loss['base']:.3f}, LUD model "
        f"{lm_loss['lud']:.3f}. {args.prompts} held-out prompts of {args.prompt_len} bytes, "
        f"{args.new_tokens} new tokens, batch {args.prompts}, fastest of {args.reps} runs "
        "after a warm-up. Shared, loaded 2-core CPU (load average ~10): times are noisy. "
        "Greedy = the same LUD loop with lookahead 0 (one token per model call).", "",
        "| method | beta | tokens/step | CPU ms/step | tokens/CPU-s | speed-up (CPU) | "
        "tokens/s (wall) | speed-up (wall) | agree w/ greedy | match ref | NLL (LUD model) | "
        "NLL (base model) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows_out:
        lines.append(f"| {r['method']} | {r['beta'] if r['beta'] is not None else '-'} | "
                     f"{r['tokens_per_step']:.2f} | {r['cpu_ms_per_step']:.1f} | "
                     f"{r['tokens_per_cpu_s']:.0f} | {r['speedup_cpu']:.2f}x | "
                     f"{r['tokens_per_s']:.0f} | "
                     f"{r['speedup_wall']:.2f}x | {r['agree_with_greedy']:.3f} | "
                     f"{r['match_reference']:.3f} | {r['nll_lud_model']:.3f} | "
                     f"{r['nll_base_model']:.3f} |")
    (out_dir / "lud_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
