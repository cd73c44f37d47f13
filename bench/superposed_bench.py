"""Superposed Decoding (k = 3) vs nucleus sampling: speed and quality on a tiny byte-level model.

Run: ``.venv/bin/python bench/superposed_bench.py [--steps 200] [--new-tokens 32]``.

The model is the ``tiny`` preset trained for ``--steps`` steps on byte-level
source files of the running Python's standard library (ids = byte + 3);
the n-gram table (orders 2..6) is built by cadenza from the same training
files. Prompts are 15-byte windows of held-out stdlib files. In one run it
times, after a warm-up compile of each:

- superposed: one stream of B rows, 3 drafts per prompt;
- nucleus x3 sequential: three B-row nucleus runs one after another;
- nucleus batched: one run of 3B rows (each prompt three times).

Quality: perplexity of each generation under the model (teacher forcing,
generated tokens only) and n-gram coherence (share of generated tokens whose
4-gram, i.e. 3-token context + token, occurs in the n-gram corpus).
The nucleus sampler here is a minimal one written for this benchmark
(cadenza.decode.generate was not on main yet). Results go to
``bench/results/cpu/superposed_bench.{json,md}``.
"""

import argparse
import dataclasses
import json
import pathlib
import sysconfig
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cadenza.config import load_config
from cadenza.decode import DecodeConfig, generate, ngram_table
from cadenza.decode.config import SuperposedConfig
from cadenza.models import KVCache, Transformer, init_params
from cadenza.provenance import provenance, results_dir

TRAIN_FILES = ("textwrap.py", "string/__init__.py", "bisect.py", "heapq.py", "fnmatch.py",
               "colorsys.py", "shlex.py", "glob.py", "argparse.py", "difflib.py")
HELD_OUT = ("calendar.py", "locale.py", "pprint.py", "reprlib.py")
PROMPT_LEN = 15


def _ids(path: pathlib.Path) -> np.ndarray:
    return np.frombuffer(path.read_bytes(), np.uint8).astype(np.int32) + ngram_table.BYTE_OFFSET


def train(cfg, files, steps: int, seed: int = 0):
    """Adam on random 129-byte windows, batch 8: returns params and the last loss."""
    model = Transformer(cfg)
    data = np.concatenate([_ids(f) for f in files])
    params = init_params(cfg, jax.random.key(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(20, steps // 5), steps)
    opt = optax.adamw(schedule, weight_decay=0.01)
    state = opt.init(params)

    @jax.jit
    def step(p, s, tokens):
        def loss_fn(p):
            logits, _, _ = model.apply({"params": p}, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng = np.random.default_rng(seed)
    loss = None
    for _ in range(steps):
        starts = rng.integers(0, len(data) - 130, size=8)
        batch = jnp.asarray(np.stack([data[s:s + 129] for s in starts]))
        params, state, loss = step(params, state, batch)
    return params, float(loss)


def nucleus_fn(model, new_tokens: int, top_p: float, temperature: float):
    """A minimal jitted nucleus sampler for equal-length prompts int32 [B, T]."""
    @jax.jit
    def run(params, prompts, key):
        b, t = prompts.shape
        cache = KVCache.create(model.config, b, t + new_tokens)
        logits, _, cache = model.apply({"params": params}, prompts, cache=cache)
        cache = cache.advance(t)

        def sample(logits, i):
            logits = logits / temperature
            order = jnp.argsort(-logits, axis=-1)
            sorted_logits = jnp.take_along_axis(logits, order, -1)
            probs = jax.nn.softmax(sorted_logits, -1)
            drop = jnp.cumsum(probs, -1) - probs > top_p
            choice = jax.random.categorical(jax.random.fold_in(key, i),
                                            jnp.where(drop, -jnp.inf, sorted_logits))
            return jnp.take_along_axis(order, choice[:, None], -1)[:, 0]

        out = jnp.zeros((b, new_tokens), jnp.int32).at[:, 0].set(sample(logits[:, -1], 0))

        def body(i, carry):
            out, cache = carry
            last = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, 1)
            logits, _, cache = model.apply({"params": params}, last, cache=cache)
            return out.at[:, i].set(sample(logits[:, 0], i)), cache.advance(1)

        return jax.lax.fori_loop(1, new_tokens, body, (out, cache))[0]

    return run


def perplexity_fn(model):
    """Per-row perplexity of continuation tokens [R, N] (first ``lengths`` count) after prompts."""
    @jax.jit
    def run(params, prompts, continuations, lengths):
        seq = jnp.concatenate([prompts, continuations], 1)
        logits, _, _ = model.apply({"params": params}, seq[:, :-1])
        logp = jax.nn.log_softmax(logits[:, prompts.shape[1] - 1:], -1)
        tok = jnp.take_along_axis(logp, continuations[..., None], -1)[..., 0]
        mask = jnp.arange(continuations.shape[1])[None] < lengths[:, None]
        return jnp.exp(-(tok * mask).sum(1) / lengths)

    return run


def coherence(prompts, continuations, lengths, fourgrams: set) -> float:
    """Share of generated tokens whose 4-gram occurs in the n-gram corpus."""
    hits = total = 0
    for p, c, n in zip(prompts, continuations, lengths):
        seq = list(p) + list(c[:n])
        for i in range(len(p), len(seq)):
            hits += tuple(seq[i - 3:i + 1]) in fourgrams
            total += 1
    return hits / total


def timed(fn, reps: int):
    """Median wall time of ``reps`` calls (after one warm-up call) and the last result."""
    out = jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = parser.parse_args()
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    train_files = [root / f for f in TRAIN_FILES if (root / f).is_file()]
    cfg = load_config(None, [], preset="tiny").model
    model = Transformer(cfg)

    t0 = time.perf_counter()
    params, loss = train(cfg, train_files, args.steps)
    train_s = time.perf_counter() - t0
    table_dir = tempfile.mkdtemp(prefix="superposed_ngram_")
    manifest = ngram_table.build_from_files([str(f) for f in train_files], table_dir, max_order=6)
    table = ngram_table.load_ngram_table(table_dir)
    fourgrams = set()
    for f in train_files:
        ids = [1] + _ids(f).tolist() + [2]
        fourgrams.update(zip(ids, ids[1:], ids[2:], ids[3:]))

    rng = np.random.default_rng(0)
    held = np.concatenate([_ids(root / f) for f in HELD_OUT if (root / f).is_file()])
    starts = rng.integers(0, len(held) - PROMPT_LEN, size=args.prompts)
    prompts = np.stack([held[s:s + PROMPT_LEN] for s in starts]).astype(np.int32)
    b, n, k = args.prompts, args.new_tokens, 3
    config = DecodeConfig(method="superposed", max_new_tokens=n,
                          superposed=SuperposedConfig(num_drafts=k))
    device_table = table.to_device()
    p_dev = jnp.asarray(prompts)
    nucleus = nucleus_fn(model, n, top_p=0.9, temperature=1.0)
    keys = [jax.random.key(i) for i in range(3)]

    sup_s, sup_res = timed(lambda: generate(model, params, prompts.tolist(), config,
                                            table=device_table), args.reps)
    seq_s, nuc_seq = timed(lambda: [nucleus(params, p_dev, key) for key in keys], args.reps)
    rep = jnp.repeat(p_dev, k, axis=0)
    bat_s, nuc_bat = timed(lambda: nucleus(params, rep, keys[0]), args.reps)

    ppl = perplexity_fn(model)
    sup_tokens = np.asarray(sup_res.extras["tokens"])
    sup_lengths = np.asarray(sup_res.extras["lengths"])
    flat_prompts = np.repeat(prompts, k, axis=0)
    sup_ppl = np.asarray(ppl(params, jnp.asarray(flat_prompts),
                             jnp.asarray(sup_tokens.reshape(b * k, n)),
                             jnp.asarray(sup_lengths.reshape(-1)))).reshape(b, k)
    nuc_tokens = np.concatenate([np.asarray(x) for x in nuc_seq])
    nuc_prompts = np.concatenate([prompts] * 3)
    full = jnp.full((3 * b,), n, jnp.int32)
    nuc_ppl = np.asarray(ppl(params, jnp.asarray(nuc_prompts), jnp.asarray(nuc_tokens), full))
    bat_ppl = np.asarray(ppl(params, rep, nuc_bat, full))
    distinct = np.mean([len({tuple(sup_tokens[i, d, :sup_lengths[i, d]]) for d in range(k)}) / k
                        for i in range(b)])

    def row(name, seconds, generations, ppl_values, coh):
        return {"method": name, "seconds": seconds, "generations": generations,
                "tokens_per_s": generations * n / seconds, "ms_per_prompt": 1e3 * seconds / b,
                "perplexity_mean": float(np.mean(ppl_values)),
                "perplexity_median": float(np.median(ppl_values)), "ngram4_coherence": coh}

    rows = [
        row("superposed k=3 (all drafts)", sup_s, b * k, sup_ppl,
            coherence(flat_prompts, sup_tokens.reshape(b * k, n), sup_lengths.reshape(-1),
                      fourgrams)),
        row("superposed k=3 (best draft)", sup_s, b, sup_ppl[:, 0],
            coherence(prompts, sup_tokens[:, 0], sup_lengths[:, 0], fourgrams)),
        row("nucleus p=0.9 x3 sequential", seq_s, 3 * b, nuc_ppl,
            coherence(nuc_prompts, nuc_tokens, [n] * 3 * b, fourgrams)),
        row("nucleus p=0.9 batched 3 rows/prompt", bat_s, 3 * b, bat_ppl,
            coherence(np.asarray(rep), np.asarray(nuc_bat), [n] * 3 * b, fourgrams)),
    ]
    result = {
        "benchmark": "superposed_vs_nucleus", **provenance(),
        "model": {"preset": "tiny", "weights": f"trained {args.steps} steps on stdlib bytes",
                  "final_loss": loss, "train_seconds": train_s},
        "ngram_table": {"orders": manifest["orders"], "entries": manifest["entries"],
                        "tokens": manifest["corpus"]["tokens"]},
        "settings": {"prompts": b, "prompt_len": PROMPT_LEN, "new_tokens": n, "k": k,
                     "superposed": {f.name: getattr(config, f.name) for f in
                                    dataclasses.fields(config)},
                     "nucleus": {"top_p": 0.9, "temperature": 1.0}, "reps": args.reps,
                     "timing": "median wall time after one warm-up call"},
        "superposed_distinct_draft_fraction": float(distinct),
        "speedup_vs_sequential": seq_s / sup_s, "speedup_vs_batched": bat_s / sup_s,
        "rows": rows,
        "example": {"prompt": bytes(int(t) - 3 for t in prompts[0]).decode("utf-8", "replace"),
                    "superposed": [bytes(int(t) - 3 for t in sup_tokens[0, d] if t >= 3)
                                   .decode("utf-8", "replace") for d in range(k)]},
    }
    commit = result["commit"]
    out = results_dir(__file__, args.out)
    (out / "superposed_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Superposed Decoding vs nucleus sampling ({result['device']}, "
             f"{result['device_kind']})", "",
             f"jax {result['jax']}, commit {commit}, {result['date']}. Model: tiny preset, "
             f"{result['model']['weights']} (final loss {loss:.3f}). {b} prompts of "
             f"{PROMPT_LEN} held-out bytes, {n} new tokens, k = {k}; "
             f"{result['settings']['timing']} of {args.reps}.", "",
             "| method | s | generations | tokens/s | ms/prompt | ppl mean | ppl median "
             "| 4-gram coherence |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seconds']:.3f} | {r['generations']} | "
                     f"{r['tokens_per_s']:.0f} | {r['ms_per_prompt']:.1f} | "
                     f"{r['perplexity_mean']:.2f} | {r['perplexity_median']:.2f} | "
                     f"{r['ngram4_coherence']:.3f} |")
    lines += ["", f"Speed-up of superposed (3 drafts/prompt) vs 3 sequential nucleus runs: "
              f"{result['speedup_vs_sequential']:.2f}x; vs one batched 3-row nucleus run: "
              f"{result['speedup_vs_batched']:.2f}x. Distinct drafts: {distinct:.2f}.", ""]
    (out / "superposed_bench.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
