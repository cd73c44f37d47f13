"""Where int8 weight-only decoding departs from the float model, and whether finer int8
formats help.

    .venv/bin/python bench/quant_int8_error.py [--model DIR | --size 20m] [--prompts 16]
        [--new-tokens 64]

The models and prompts of ``bench/quant_agreement.py`` (its trained code model and the
same config at random init; held-out stdlib prompts). Each int8 variant is applied by
fake quantisation (every targeted float kernel replaced by its quantised-then-dequantised
values; the library's own formats give the same logits as fake quantisation, which
tests/test_quantization.py checks), on the default targets (every projection but
``lm_head``):

- ``channel``: the library's ``int8`` (a scale per output channel, absmax / 127);
- ``channel mse``: per channel, the clip ratio (0.5 ... 1 of the absmax, 26 steps)
  minimising the channel's squared error;
- ``group 128`` / ``64`` / ``32``: a scale per output channel and group of that many
  consecutive inputs (finer groups: smaller errors, more scale bytes).

Per variant and model: identical ``--new-tokens`` greedy continuations; teacher-forced
(the float continuation fed in one forward) top-1 agreement per position and the RMS
change of the float model's top-1 minus top-2 logit gap (how far quantisation moves the
margin that decides the argmax); and at each free-running first divergence the float
model's margin there. Also, on the trained model, the gap change with ``channel`` int8
on one projection kind only (all layers) and on one layer only (all kinds): which
weights' error dominates. Writes ``bench/results/<device>/quant_int8_error.{json,md}``.
"""

import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from cadenza.decode import DecodeConfig, generate
from cadenza.models import Transformer, init_params, quant
from cadenza.models.config import DEFAULT_QUANT_TARGETS
from cadenza.train.peft.sites import get_path, projection_sites, select_sites

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from quant_agreement import agreement, arguments, load_target, write_json  # noqa: E402

CLIP_RATIOS = np.linspace(0.5, 1.0, 26)


def fake_int8(w, n_in: int, variant: str):
    """One kernel [*in, *out] quantised to int8 and back by ``variant``."""
    if variant == "channel":
        return quant.dequantize_kernel(quant.quantize_kernel(w, n_in, "int8"), w.shape, n_in,
                                       "int8")
    k = int(np.prod(w.shape[:n_in]))
    w2 = w.reshape(k, -1)
    if variant == "channel mse":
        absmax = jnp.max(jnp.abs(w2), 0)
        best, best_err = w2, jnp.full(absmax.shape, jnp.inf)
        for r in CLIP_RATIOS:
            scale = jnp.where(absmax > 0, absmax * r, 1.0) / 127
            d = jnp.clip(jnp.round(w2 / scale), -127, 127) * scale
            err = jnp.sum((d - w2) ** 2, 0)
            best = jnp.where((err < best_err)[None], d, best)
            best_err = jnp.minimum(err, best_err)
        return best.reshape(w.shape)
    group = int(variant.split()[1])
    wg = w2.reshape(k // group, group, -1)
    absmax = jnp.max(jnp.abs(wg), 1, keepdims=True)
    scale = jnp.where(absmax > 0, absmax, 1.0) / 127
    return (jnp.round(wg / scale) * scale).reshape(w.shape)


VARIANTS = ("channel", "channel mse", "group 128", "group 64", "group 32")


def fake_quantize(config, params, variant: str, kind: str | None = None,
                  layer: int | None = None):
    """``params`` with the default targets fake-quantised by ``variant`` (only the
    projections named ``kind``, only stacked layer ``layer``, when given)."""
    sites = [s for s in select_sites(projection_sites(config), DEFAULT_QUANT_TARGETS)
             if not s.experts and (kind is None or s.path[-1] == kind)]
    params = jax.tree.map(lambda a: a, params)
    for s in sites:
        module = get_path(params, s.path)
        fn = jax.jit(functools.partial(fake_int8, n_in=len(s.in_shape), variant=variant))
        if layer is None:
            module["kernel"] = jax.vmap(fn)(module["kernel"]) if s.layers else fn(module["kernel"])
        elif s.layers:
            module["kernel"] = module["kernel"].at[layer].set(fn(module["kernel"][layer]))
    return params


def study(config, params, prompts, greedy: DecodeConfig, attribution: bool) -> dict:
    """Every variant's agreement with the float model (see the module docstring)."""
    model = Transformer(config)
    ref = generate(model, params, prompts, greedy).token_ids
    tokens = jnp.array([p + c for p, c in zip(prompts, ref)])
    cont = slice(len(prompts[0]) - 1, -1)
    logits = jax.jit(lambda p: model.apply({"params": p}, tokens)[0][:, cont])
    ref_logits = logits(params)
    values, idx = jax.lax.top_k(ref_logits, 2)
    margin = values[..., 0] - values[..., 1]

    def teacher_forced(p) -> tuple[dict, jnp.ndarray]:
        ql = logits(p)
        gap = (jnp.take_along_axis(ql, idx[..., :1], -1) -
               jnp.take_along_axis(ql, idx[..., 1:], -1))[..., 0] - margin
        return {"top1": float(jnp.mean(jnp.argmax(ql, -1) == idx[..., 0])),
                "gap_change_rms": float(jnp.sqrt(jnp.mean(gap ** 2)))}, gap

    out = {"margin_quantiles": {str(q): float(np.quantile(np.asarray(margin), q))
                                for q in (0.01, 0.05, 0.1, 0.5)}, "variants": {}}
    for variant in VARIANTS:
        qp = fake_quantize(config, params, variant)
        row, gap = teacher_forced(qp)
        ours = generate(model, qp, prompts, greedy).token_ids
        first = [(j, next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None))
                 for j, (x, y) in enumerate(zip(ours, ref))]
        row["equal"] = agreement(ours, ref)["equal"]
        row["first_divergence"] = [{"position": i, "float_margin": float(margin[j, i]),
                                    "gap_change": float(gap[j, i])}
                                   for j, i in first if i is not None]
        out["variants"][variant] = row
        print(variant, json.dumps(row), flush=True)
    if attribution:
        kinds = sorted({s.path[-1] for s in select_sites(projection_sites(config),
                                                         DEFAULT_QUANT_TARGETS)})
        out["by_kind"] = {k: teacher_forced(fake_quantize(config, params, "channel", kind=k))[0]
                          for k in kinds}
        out["by_layer"] = {str(i): teacher_forced(fake_quantize(config, params, "channel",
                                                                layer=i))[0]
                           for i in range(config.num_layers)}
        print(json.dumps({"by_kind": out["by_kind"], "by_layer": out["by_layer"]}), flush=True)
    return out


def main() -> None:
    args = arguments(__doc__).parse_args()
    model_dir, config, params, prompts, modules = load_target(args)
    if not config.scan_layers:
        raise SystemExit("quant_int8_error expects a model with scanned layers")
    greedy = DecodeConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    rows = {"trained": study(config, params, prompts, greedy, attribution=True),
            "random": study(config, init_params(config, jax.random.key(0)), prompts, greedy,
                            attribution=False)}
    meta, out = write_json("quant_int8_error", args, model_dir, config, prompts, modules,
                           rows)
    lines = [
        "# int8 weight-only: where greedy decoding departs from the float model",
        "",
        f"jax {meta['jax']}, commit {meta['commit']}, {meta['date']}, {meta['device']}, host "
        f"load average {meta['load_avg_1m']:.1f} at the end (agreement does not depend on "
        f"load). Model {meta['model']} ({config.num_layers} layers, width "
        f"{config.hidden_size}) and the same config at init; {len(prompts)} held-out prompts "
        f"of {args.prompt_len} tokens, {args.new_tokens} greedy tokens, float32 compute, "
        "int8 variants by fake quantisation on the default targets (lm_head float).",
        "",
        "Per variant: identical continuations / teacher-forced top-1 agreement per position "
        "/ RMS change of the float top-1 minus top-2 logit gap (nats) / float margin at the "
        "free-running first divergences (median, max; nats).",
        "",
        "| model | float margin quantiles 1% / 5% / 10% / 50% | " + " | ".join(VARIANTS) + " |",
        "|" + "---|" * (2 + len(VARIANTS)),
    ]
    for name, row in rows.items():
        mq = " / ".join(f"{v:.3f}" for v in row["margin_quantiles"].values())
        cells = []
        for v in VARIANTS:
            r = row["variants"][v]
            m = [d["float_margin"] for d in r["first_divergence"]]
            div = f"{np.median(m):.3f}, {max(m):.3f}" if m else "none"
            cells.append(f"{r['equal']:.2f} / {r['top1']:.4f} / {r['gap_change_rms']:.4f} / "
                         f"{div}")
        lines.append(f"| {name} | {mq} | " + " | ".join(cells) + " |")
    t = rows["trained"]
    lines += ["", "Trained model, `channel` int8 on one projection kind (all layers) or one "
              "layer (all kinds): teacher-forced top-1 agreement / RMS gap change.", "",
              "| quantised | top-1 | gap change RMS |", "|---|---|---|"]
    lines += [f"| {k} | {r['top1']:.4f} | {r['gap_change_rms']:.4f} |"
              for k, r in t["by_kind"].items()]
    lines += [f"| layer {k} | {r['top1']:.4f} | {r['gap_change_rms']:.4f} |"
              for k, r in t["by_layer"].items()]
    (out / "quant_int8_error.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
