"""Benchmark the attention kernels against cuDNN / XLA; writes JSON + Markdown.

    .venv/bin/python bench/kernels_attention.py            # sizes for the backend
    .venv/bin/python bench/kernels_attention.py --size tiny  # seconds on a CPU

Reports, in one run on one device:
- flash attention (causal, GQA) forward and backward TFLOP/s per implementation
  available on the backend (TPU: splash ``pallas`` + ``xla``; GPU: ``cudnn`` +
  our Mosaic GPU kernel ``pallas`` + ``xla``; CPU: ``xla``) and each one's
  ratio to the first (on GPU: to cuDNN);
- verify attention (T new tokens over a full KV cache) time for T in
  {1, 4, 16, 64} per implementation (TPU and GPU: ``pallas`` + ``xla``; CPU:
  ``xla``), its KV-read bandwidth and fraction of peak HBM bandwidth, and
  its cost relative to T=1.
Results go to bench/results/<device>/kernels_attention.{json,md} with the
device, jax version, commit and date. Interpret mode is never used (CPU runs
compare XLA only).
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from cadenza.pallas_kernels.attention import attention
from cadenza.provenance import provenance, results_dir

# peak HBM bandwidth in bytes/s by device kind (vendor figures)
PEAK_HBM = {"H100": 3.35e12, "H200": 4.8e12, "TPU v5 lite": 8.19e11, "TPU v5e": 8.19e11,
            "TPU v5p": 2.765e12, "TPU v5": 2.765e12, "TPU v4": 1.2e12, "TPU v6 lite": 1.64e12}

SIZES = {  # flash (B, T, Hq, Hkv, D), verify (B, S, Hq, Hkv, D), dtype
    "tiny": dict(flash=(1, 256, 4, 2, 64), verify=(2, 1024, 4, 2, 128), dtype="float32"),
    "full": dict(flash=(4, 4096, 32, 8, 128), verify=(8, 32768, 32, 8, 128), dtype="bfloat16"),
}


def _time(fn, *args, iters):
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _peak_hbm(kind):
    return next((v for k, v in PEAK_HBM.items() if kind.startswith(k) or k in kind), None)


def _impls(kind):
    backend = jax.default_backend()
    flash = {"tpu": ["pallas", "xla"], "gpu": ["cudnn", "pallas", "xla"]}.get(backend, ["xla"])
    verify = ["pallas", "xla"] if backend in ("tpu", "gpu") else ["xla"]
    return flash, verify


def bench_flash(impls, b, t, hq, hkv, d, dtype, iters):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, t, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, t, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, t, hkv, d), dtype)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    fwd_flops = 4 * b * hq * t * t * d / 2          # causal: half the score matrix
    rows = []
    for impl in impls:
        def f(q, k, v, impl=impl):
            return attention(q, k, v, implementation=impl, scale=d ** -0.5, q_positions=pos)
        fwd = jax.jit(f)
        fwd_bwd = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32)),
                                   argnums=(0, 1, 2)))
        t_fwd = _time(fwd, q, k, v, iters=iters)
        t_all = _time(fwd_bwd, q, k, v, iters=iters)
        t_bwd = max(t_all - t_fwd, 1e-9)
        rows.append(dict(impl=impl, fwd_ms=t_fwd * 1e3, bwd_ms=t_bwd * 1e3,
                         fwd_tflops=fwd_flops / t_fwd / 1e12,
                         bwd_tflops=2.5 * fwd_flops / t_bwd / 1e12))
    for r in rows:
        r["fwd_vs_first"] = r["fwd_tflops"] / rows[0]["fwd_tflops"]
        r["bwd_vs_first"] = r["bwd_tflops"] / rows[0]["bwd_tflops"]
    return rows


def bench_verify(impls, b, s, hq, hkv, d, dtype, iters, peak):
    ks = jax.random.split(jax.random.key(1), 5)
    k_cache = jax.random.normal(ks[0], (b, s, hkv, d), dtype)
    v_cache = jax.random.normal(ks[1], (b, s, hkv, d), dtype)
    rows = []
    for impl in impls:
        base = None
        for t in (1, 4, 16, 64):
            lengths = jnp.full((b,), s - t, jnp.int32)
            q = jax.random.normal(ks[2], (b, t, hq, d), dtype)
            k = jax.random.normal(ks[3], (b, t, hkv, d), dtype)
            v = jax.random.normal(ks[4], (b, t, hkv, d), dtype)
            kw = dict(scale=d ** -0.5, q_positions=lengths[:, None] + jnp.arange(t),
                      cache_lengths=lengths,
                      cache_positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)))
            fn = jax.jit(lambda q, k, v, kc, vc, impl=impl, kw=kw: attention(
                q, k, v, implementation=impl, k_cache=kc, v_cache=vc, **kw))
            sec = _time(fn, q, k, v, k_cache, v_cache, iters=iters)
            base = base or sec
            read = 2 * b * (s - t) * hkv * d * jnp.dtype(dtype).itemsize
            rows.append(dict(impl=impl, t=t, ms=sec * 1e3, vs_t1=sec / base,
                             kv_gb_per_s=read / sec / 1e9,
                             hbm_fraction=None if peak is None else read / sec / peak))
    return rows



def _markdown(meta, flash, verify):
    lines = [f"# Attention kernels on {meta['device']}", "",
             f"jax {meta['jax']}, commit {meta['commit']}, {meta['date']}, sizes "
             f"`{meta['size']}` (flash B,T,Hq,Hkv,D={meta['flash_shape']}; verify "
             f"B,S,Hq,Hkv,D={meta['verify_shape']}; {meta['dtype']})", "",
             "## Flash attention (causal)", "",
             "| impl | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | fwd vs first | bwd vs first |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.4f} | {r['bwd_ms']:.3f} | "
              f"{r['bwd_tflops']:.4f} | {r['fwd_vs_first']:.2f} | {r['bwd_vs_first']:.2f} |"
              for r in flash]
    lines += ["", "## Verify attention over a full cache", "",
              "| impl | T | ms | x T=1 | KV GB/s | HBM fraction |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['impl']} | {r['t']} | {r['ms']:.3f} | {r['vs_t1']:.2f} | "
              f"{r['kv_gb_per_s']:.1f} | "
              f"{'n/a' if r['hbm_fraction'] is None else format(r['hbm_fraction'], '.2f')} |"
              for r in verify]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES),
                        help="default: tiny on CPU, full on accelerators")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = parser.parse_args(argv)
    dev = jax.devices()[0]
    size = args.size or ("tiny" if dev.platform == "cpu" else "full")
    cfg = SIZES[size]
    dtype = jnp.dtype(cfg["dtype"])
    flash_impls, verify_impls = _impls(dev.device_kind)
    peak = _peak_hbm(dev.device_kind)
    flash = bench_flash(flash_impls, *cfg["flash"], dtype, args.iters)
    verify = bench_verify(verify_impls, *cfg["verify"], dtype, args.iters, peak)
    meta = dict(provenance(), device=dev.device_kind, platform=dev.platform,
                size=size, dtype=cfg["dtype"],
                flash_shape=list(cfg["flash"]), verify_shape=list(cfg["verify"]),
                peak_hbm_bytes_per_s=peak)
    out = results_dir(__file__, args.out)
    (out / "kernels_attention.json").write_text(
        json.dumps(dict(meta=meta, flash=flash, verify=verify), indent=2) + "\n")
    md = _markdown(meta, flash, verify)
    (out / "kernels_attention.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
