"""How often quantised greedy decoding equals the float model's, per format.

    .venv/bin/python bench/quant_agreement.py [--model DIR | --size 20m] [--prompts 16]
        [--new-tokens 64]

``--model``: a cadenza model directory trained on the stdlib code corpus; default: the
target of ``bench/speculative_methods.py`` at ``--size`` (its cached model under
``--runs``, trained there now when absent). Two models are compared: that trained model
and a random model of the same config
(``init_params``, seed 0). Prompts: windows of held-out stdlib modules (the trained
model's held-out split, ``speculative_methods.heldout_prompts``), the same for both.

Per format (``int8``, ``int4``, ``nf4`` weights on the default targets, every projection
but ``lm_head``, with a float cache; int4 on ``lm_head`` too; the int8 KV cache with float
weights; int8 weights with the int8 cache): free-running, the fraction of
``--new-tokens``-token greedy continuations (EOS ignored, float32 compute) identical to
the float model's and the mean fraction of tokens before the first difference;
teacher-forced (the float continuation fed to both models in one forward), the fraction
of positions whose top-1 token is the float model's, the mean KL(float || quantised) and
the largest logit difference. Also per model: the median over the float continuations'
positions of the top-1 minus top-2 logit margin, in nats and in units of the logits'
standard deviation, and the fraction of positions under 0.05 nats (quantisation noise
flips near-ties, and one flip changes the rest of the continuation).
Writes ``bench/results/<device>/quant_agreement.{json,md}``.
"""

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from cadenza.decode import DecodeConfig, generate
from cadenza.models import KVCache, Transformer, init_params, load_model, quant
from cadenza.models.checkpoint import tokenizer_dir
from cadenza.models.config import DEFAULT_QUANT_TARGETS
from cadenza.models.tokenizer import load_tokenizer
from cadenza.provenance import provenance, results_dir

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from speculative_methods import SIZES, heldout_prompts, trained  # noqa: E402

# name -> (weight scheme, kv cache, targets): the default targets (every projection but
# lm_head), and int4 with lm_head too for the cost of quantising the output head
FORMATS = {"int8": ("int8", "auto", DEFAULT_QUANT_TARGETS),
           "int4": ("int4", "auto", DEFAULT_QUANT_TARGETS),
           "int4 +lm_head": ("int4", "auto", ".*"),
           "nf4": ("nf4", "auto", DEFAULT_QUANT_TARGETS),
           "kv8": ("none", "int8", DEFAULT_QUANT_TARGETS),
           "int8+kv8": ("int8", "int8", DEFAULT_QUANT_TARGETS)}


def agreement(ours: list[list[int]], ref: list[list[int]]) -> dict:
    """Fraction of identical continuations and mean fraction of tokens before the first
    difference."""
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(y)) / len(y)
              for x, y in zip(ours, ref)]
    return {"equal": float(np.mean([x == y for x, y in zip(ours, ref)])),
            "prefix": float(np.mean(prefix))}


def teacher_forced(config, params, tokens, kv: str):
    """Logits [B, L, vocab] of ``tokens`` in one forward: without a cache, or (``kv`` =
    ``int8``) into an empty int8 cache, where every token attends to the keys/values as
    read back from int8, exactly as token-by-token decoding over that cache does."""
    cache = KVCache.create(config, *tokens.shape, jnp.int8) if kv == "int8" else None
    return Transformer(config).apply({"params": params}, tokens, cache=cache)[0]


def margin(logits) -> dict:
    """Medians over the continuation positions (``logits`` [B, N, vocab]) of the top-1
    minus top-2 logit, in nats (the log of their probability ratio) and in units of the
    logits' standard deviation; and the fraction of positions under 0.05 nats."""
    top = jax.lax.top_k(logits, 2)[0]
    gap = top[..., 0] - top[..., 1]
    return {"nats": float(jnp.median(gap)), "std": float(jnp.median(gap / logits.std(-1))),
            "under_0.05": float(jnp.mean(gap < 0.05))}


def per_position(ours, ref) -> dict:
    """Teacher-forced comparison of continuation logits [B, N, vocab] with the float
    model's: fraction of positions with the same argmax, mean KL(float || ours) in nats,
    and the largest |logit difference|."""
    lp, lq = jax.nn.log_softmax(ref), jax.nn.log_softmax(ours)
    return {"top1": float(jnp.mean(jnp.argmax(ours, -1) == jnp.argmax(ref, -1))),
            "kl": float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1))),
            "max_dlogit": float(jnp.max(jnp.abs(ours - ref)))}


def measure(config, params, prompts, greedy: DecodeConfig) -> dict:
    """The float continuations' margin and every format's agreement with them, free-running
    (greedy decoding) and teacher-forced (the float continuation fed to both models)."""
    ref = generate(Transformer(config), params, prompts, greedy).token_ids
    tokens = jnp.array([p + c for p, c in zip(prompts, ref)])
    cont = slice(len(prompts[0]) - 1, -1)     # the logits that predicted the continuation
    ref_logits = teacher_forced(config, params, tokens, "auto")[:, cont]
    row = {"margin": margin(ref_logits)}
    for name, (scheme, kv, targets) in FORMATS.items():
        qc = dataclasses.replace(config, weight_quant=scheme, weight_quant_targets=targets)
        qp = quant.quantize_params(params, qc) if scheme != "none" else params
        ours = generate(Transformer(qc), qp, prompts,
                        dataclasses.replace(greedy, kv_cache=kv)).token_ids
        row[name] = {**agreement(ours, ref),
                     **per_position(teacher_forced(qc, qp, tokens, kv)[:, cont], ref_logits)}
        print(name, row[name], flush=True)
    return row


def table(rows: dict, cell, margin: bool) -> list[str]:
    """Markdown table lines: a row per model of ``rows`` (as :func:`measure` returns), a
    column per format with ``cell(format's results)``, after the margin when ``margin``."""
    head = ["model"] + (["top-1 margin nats (std) / under 0.05"] if margin else []) + list(FORMATS)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        m = row["margin"]
        first = [f"{m['nats']:.2f} ({m['std']:.2f}) / {m['under_0.05']:.3f}"] if margin else []
        lines.append("| " + " | ".join([name, *first, *(cell(row[f]) for f in FORMATS)]) + " |")
    return lines


def arguments(doc: str) -> argparse.ArgumentParser:
    """The command line shared with ``bench/quant_int8_error.py``: the model and prompts."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="trained cadenza model directory")
    ap.add_argument("--size", default="20m", choices=list(SIZES),
                    help="without --model: speculative_methods' target of this size")
    ap.add_argument("--runs", default="runs/spec_methods", help="its trained models (cached)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="default: bench/results/<device>")
    return ap


def load_target(args):
    """``(model_dir, float32 model config, float32 params, prompts, prompt modules)`` of
    :func:`arguments`' model (trained now when absent)."""
    if args.model:
        model_dir = pathlib.Path(args.model)
    else:
        size = SIZES[args.size]
        model_dir = trained(pathlib.Path(args.runs) / args.size, "target", "tiny_pretrain",
                            size["target"], size["target_steps"], {})
    experiment, params = load_model(model_dir)
    config = dataclasses.replace(experiment.model, dtype="float32", param_dtype="float32")
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    tok = load_tokenizer(tokenizer_dir(model_dir))
    prompts, modules = heldout_prompts(tok, experiment.data.heldout_fraction, args.prompts,
                                       args.prompt_len)
    return model_dir, config, params, prompts, modules


def write_json(name: str, args, model_dir, config, prompts, modules, rows, **extra):
    """Writes ``<results>/<name>.json`` (the stamp, the model, the prompts, ``extra`` and
    ``rows``); returns ``(meta, results folder)``."""
    meta = {**provenance(), "model": "/".join(pathlib.Path(model_dir).parts[-3:]), **extra,
            "layers": config.num_layers, "hidden": config.hidden_size,
            "prompts": len(prompts), "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "prompt_modules": modules}
    out = results_dir(__file__, args.out)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return meta, out


def main() -> None:
    args = arguments(__doc__).parse_args()
    model_dir, config, params, prompts, modules = load_target(args)
    greedy = DecodeConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    rows = {}
    for name, p in (("trained", params), ("random", init_params(config, jax.random.key(0)))):
        print(name, flush=True)
        rows[name] = measure(config, p, prompts, greedy)
    meta, out = write_json("quant_agreement", args, model_dir, config, prompts, modules, rows,
                           params=n_params, vocab=config.vocab_size)
    lines = [
        "# Quantised greedy decoding vs the float model: identical continuations per format",
        "",
        f"jax {meta['jax']}, commit {meta['commit']}, {meta['date']}, {meta['device']}, "
        f"host load average {meta['load_avg_1m']:.1f} at the end (a shared machine; agreement does "
        f"not depend on load). Model {meta['model']}: {n_params / 1e6:.1f}M params, "
        f"{config.num_layers} layers, width {config.hidden_size}, vocab {config.vocab_size}; "
        f"'random' is the same config at init. {len(prompts)} prompts of {args.prompt_len} "
        f"tokens from held-out stdlib modules, {args.new_tokens} greedy tokens each, "
        "float32 compute, default targets (see FORMATS). Margin: median top-1 minus top-2 "
        "logit of the float model over the continuation positions, in nats (in logit "
        "standard deviations), and the fraction of positions under 0.05 nats.",
        "",
        "Free-running (each model decodes greedily on its own): identical continuations / "
        "mean fraction of tokens before the first difference.",
        "",
        *table(rows, lambda r: f"{r['equal']:.2f} / {r['prefix']:.2f}", margin=True),
        "",
        "Teacher-forced (the float continuation fed to both models, the int8 cache filled "
        "as decoding fills it): fraction of positions whose top-1 token equals the float "
        f"model's (that fraction to the power {args.new_tokens}: the identical continuations "
        "independent flips would give) / mean KL(float || quantised) nats / max |logit "
        "difference|.",
        "",
        *table(rows, lambda r: f"{r['top1']:.4f} ({r['top1'] ** args.new_tokens:.2f}) / "
                               f"{r['kl']:.1e} / {r['max_dlogit']:.2f}", margin=False),
    ]
    (out / "quant_agreement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
