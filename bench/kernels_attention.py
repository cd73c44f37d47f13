"""Benchmark the attention kernels against cuDNN / XLA; writes JSON + Markdown.

    .venv/bin/python bench/kernels_attention.py            # sizes for the backend
    .venv/bin/python bench/kernels_attention.py --size tiny  # seconds on a CPU
    python3 bench/kernels_attention.py --upstream             # GPU: + upstream kernels

Reports, in one run on one device:
- flash attention (causal, GQA) forward and backward TFLOP/s per implementation
  available on the backend (TPU: splash ``pallas`` + ``xla``; GPU: ``cudnn`` +
  our Mosaic GPU kernel ``pallas`` + ``xla``; CPU: ``xla``) and each one's
  ratio to the first (on GPU: to cuDNN);
- verify attention (T new tokens over a full KV cache) time for T in
  {1, 4, 16, 64} per implementation (TPU and GPU: ``pallas`` + ``xla``; CPU:
  ``xla``), its KV-read bandwidth and fraction of peak HBM bandwidth, and
  its cost relative to T=1; each implementation also over an int8 cache
  (``<impl>+int8kv``: codes + per-slot, per-head scales, read at ``head_dim + 4``
  bytes per token and head);
- with ``--upstream`` on a GPU, the same cases for jax's own Pallas GPU kernels and
  tokamax (``cadenza.pallas_kernels.upstream_gpu``): flash rows for ``attention_mgpu`` and
  tokamax, verify rows for jax's Triton decode / paged kernels and tokamax.
Contenders of one case are timed interleaved (round r times each once), median of
``--iters`` rounds with the min-max spread. Every row's forward output is checked
against a float32 reference (``max_err``); a kernel that fails to compile or run is
listed under "failed" with its error, and the exit code is 1 when one of cadenza's own
kernels failed (upstream failures are results, not errors).
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

from cadenza.models.cache import quantize_kv
from cadenza.pallas_kernels import upstream_gpu
from cadenza.pallas_kernels.attention import attention
from cadenza.pallas_kernels.attention_reference import reference_attention
from cadenza.provenance import provenance, results_dir
from cadenza.train.metrics import peak_hbm_bytes_per_s

SIZES = {  # flash (B, T, Hq, Hkv, D), verify (B, S, Hq, Hkv, D), dtype
    "tiny": dict(flash=(1, 256, 4, 2, 64), verify=(2, 1024, 4, 2, 128), dtype="float32"),
    "full": dict(flash=(4, 4096, 32, 8, 128), verify=(8, 32768, 32, 8, 128), dtype="bfloat16"),
}


def _time_interleaved(calls: dict, iters: int, failed: list, case: str) -> dict:
    """``{name: (fn, args)}`` -> ``{name: (median s, min s, max s, first output)}``: each
    compiled and run once, then ``iters`` rounds timing each once in turn. A call that
    raises goes to ``failed`` (with ``case``) and out of the rounds."""
    outs = {}
    for name, (fn, args) in calls.items():
        try:
            outs[name] = jax.block_until_ready(fn(*args))
        except Exception as e:   # a kernel that does not compile/run here is a result
            failed.append({"impl": name, "case": case,
                           "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
    samples = {name: [] for name in outs}
    for _ in range(iters):
        for name in outs:
            fn, args = calls[name]
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples[name].append(time.perf_counter() - t0)
    return {n: (statistics.median(v), min(v), max(v), outs[n]) for n, v in samples.items()}


def _err(out, ref) -> float:
    """Max |out - ref| (first output if a tuple), float32."""
    out = out[0] if isinstance(out, tuple) else out
    return float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))


def _impls():
    """cadenza's implementations to time on this backend: (flash, verify)."""
    backend = jax.default_backend()
    flash = {"tpu": ["pallas", "xla"], "gpu": ["cudnn", "pallas", "xla"]}.get(backend, ["xla"])
    verify = ["pallas", "xla"] if backend in ("tpu", "gpu") else ["xla"]
    return flash, verify


def _grad(f):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)),
                            argnums=(0, 1, 2)))


def bench_flash(impls, upstream, b, t, hq, hkv, d, dtype, iters, failed):
    """Causal flash attention rows: fwd and fwd+bwd timed (bwd = the difference)."""
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, t, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, t, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, t, hkv, d), dtype)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    scale = d ** -0.5
    fwd_flops = 4 * b * hq * t * t * d / 2          # causal: half the score matrix
    fns = {impl: (lambda q, k, v, impl=impl: attention(q, k, v, implementation=impl,
                                                       scale=scale, q_positions=pos))
           for impl in impls}
    fns.update(upstream)
    fwd = _time_interleaved({n: (jax.jit(f), (q, k, v)) for n, f in fns.items()}, iters,
                            failed, "flash fwd")
    both = _time_interleaved({n: (_grad(fns[n]), (q, k, v)) for n in fwd}, iters, failed,
                             "flash fwd+bwd")
    ref = reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), scale=scale,
                              q_positions=pos)
    rows = []
    for n in fwd:
        t_fwd, lo, hi, out = fwd[n]
        row = dict(impl=n, fwd_ms=t_fwd * 1e3, fwd_ms_spread=[lo * 1e3, hi * 1e3],
                   fwd_tflops=fwd_flops / t_fwd / 1e12, max_err=_err(out, ref),
                   bwd_ms=None, bwd_tflops=None)
        if n in both and both[n][0] > t_fwd:   # else noise exceeded the backward: n/a
            t_bwd = both[n][0] - t_fwd
            row.update(bwd_ms=t_bwd * 1e3, bwd_tflops=2.5 * fwd_flops / t_bwd / 1e12)
        rows.append(row)
    for r in rows:
        r["fwd_vs_first"] = r["fwd_tflops"] / rows[0]["fwd_tflops"]
        r["bwd_vs_first"] = (None if r["bwd_tflops"] is None or rows[0]["bwd_tflops"] is None
                             else r["bwd_tflops"] / rows[0]["bwd_tflops"])
    return rows


def bench_verify(impls, upstream, b, s, hq, hkv, d, dtype, iters, peak, failed):
    """Verify-attention rows: T new tokens over a cache of S - T valid entries."""
    ks = jax.random.split(jax.random.key(1), 5)
    k_cache = jax.random.normal(ks[0], (b, s, hkv, d), dtype)
    v_cache = jax.random.normal(ks[1], (b, s, hkv, d), dtype)
    scale = d ** -0.5
    k8, ks8 = quantize_kv(k_cache)   # the int8 cache rows: codes + per-slot, per-head scales
    v8, vs8 = quantize_kv(v_cache)
    prepared = {}
    for name, (prepare, _) in upstream.items():
        try:
            prepared[name] = jax.block_until_ready(jax.jit(prepare)(k_cache, v_cache))
        except Exception as e:
            failed.append({"impl": name, "case": "verify cache layout",
                           "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
    rows, base = [], {}
    for t in (1, 4, 16, 64):
        lengths = jnp.full((b,), s - t, jnp.int32)
        q = jax.random.normal(ks[2], (b, t, hq, d), dtype)
        k = jax.random.normal(ks[3], (b, t, hkv, d), dtype)
        v = jax.random.normal(ks[4], (b, t, hkv, d), dtype)
        kw = dict(scale=scale, q_positions=lengths[:, None] + jnp.arange(t),
                  cache_lengths=lengths,
                  cache_positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)))
        calls = {impl: (jax.jit(lambda q, k, v, kc, vc, impl=impl, kw=kw: attention(
            q, k, v, implementation=impl, k_cache=kc, v_cache=vc, **kw)),
            (q, k, v, k_cache, v_cache)) for impl in impls}
        calls.update({f"{impl}+int8kv": (jax.jit(lambda q, k, v, kc, vc, ksc, vsc, impl=impl,
                                                  kw=kw: attention(
            q, k, v, implementation=impl, k_cache=kc, v_cache=vc, k_scale=ksc, v_scale=vsc,
            **kw)), (q, k, v, k8, v8, ks8, vs8)) for impl in impls})
        calls.update({name: (jax.jit(upstream[name][1]), (q, kv, lengths))
                      for name, kv in prepared.items()})
        timed = _time_interleaved(calls, iters, failed, f"verify T={t}")
        f32 = [x.astype(jnp.float32) for x in (q, k, v, k_cache, v_cache)]
        ours_ref = reference_attention(*f32[:3], k_cache=f32[3], v_cache=f32[4], **kw)
        int8_ref = reference_attention(*f32[:3], k_cache=k8, v_cache=v8, k_scale=ks8,
                                       v_scale=vs8, **kw)
        cache_ref = upstream_gpu.cache_only_reference(q, k_cache, v_cache, lengths, scale)
        for name, (sec, lo, hi, out) in timed.items():
            int8 = name.endswith("+int8kv")
            read = 2 * b * (s - t) * hkv * (d + 4 if int8 else d * jnp.dtype(dtype).itemsize)
            ref = cache_ref if name in upstream else int8_ref if int8 else ours_ref
            base.setdefault(name, sec)
            rows.append(dict(impl=name, t=t, ms=sec * 1e3, ms_spread=[lo * 1e3, hi * 1e3],
                             vs_t1=sec / base[name], kv_gb_per_s=read / sec / 1e9,
                             hbm_fraction=None if peak is None else read / sec / peak,
                             max_err=_err(out, ref),
                             new_tokens_attend_each_other=name not in upstream))
    return rows


def _markdown(meta, flash, verify, failed):
    lines = [f"# Attention kernels on {meta['device']}", "",
             f"jax {meta['jax']}, commit {meta['commit']}, {meta['date']}, sizes "
             f"`{meta['size']}` (flash B,T,Hq,Hkv,D={meta['flash_shape']}; verify "
             f"B,S,Hq,Hkv,D={meta['verify_shape']}; {meta['dtype']})", "",
             "## Flash attention (causal)", "",
             f"Median of {meta['iters']} interleaved rounds (min-max in brackets); max err: "
             "largest |output - float32 reference|.", "",
             "| impl | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | fwd vs first | bwd vs first "
             "| max err |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['impl']} | {r['fwd_ms']:.3f} [{_spread(r['fwd_ms_spread'])}] | "
              f"{r['fwd_tflops']:.4f} | {_f(r['bwd_ms'], '.3f')} | {_f(r['bwd_tflops'], '.4f')} | "
              f"{r['fwd_vs_first']:.2f} | {_f(r['bwd_vs_first'], '.2f')} | {r['max_err']:.2g} |"
              for r in flash]
    lines += ["", "## Verify attention over a full cache", "",
              "Upstream rows (jax, tokamax) attend the new tokens to the cache only; "
              "cadenza's also to each other (causal).", "",
              "| impl | T | ms | x T=1 | KV GB/s | HBM fraction | max err |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['impl']} | {r['t']} | {r['ms']:.3f} [{_spread(r['ms_spread'])}] | "
              f"{r['vs_t1']:.2f} | {r['kv_gb_per_s']:.1f} | {_f(r['hbm_fraction'], '.2f')} | "
              f"{r['max_err']:.2g} |" for r in verify]
    if failed or meta["upstream_missing"]:
        lines += ["", "## Not measured", ""]
        lines += [f"- {f['impl']} ({f['case']}): {f['error']}" for f in failed]
        lines += [f"- {m}" for m in meta["upstream_missing"]]
    return "\n".join(lines) + "\n"


def _f(x, spec):
    return "n/a" if x is None else format(x, spec)


def _spread(lo_hi):
    return f"{lo_hi[0]:.3f}-{lo_hi[1]:.3f}"


def _write(out, meta, flash, verify, failed) -> str:
    """kernels_attention.{json,md} in ``out``; the Markdown."""
    (out / "kernels_attention.json").write_text(
        json.dumps(dict(meta=meta, flash=flash, verify=verify, failed=failed), indent=2) + "\n")
    md = _markdown(meta, flash, verify, failed)
    (out / "kernels_attention.md").write_text(md)
    return md


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES),
                        help="default: tiny on CPU, full on accelerators")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None, help="default: bench/results/<device>")
    parser.add_argument("--upstream", action="store_true",
                        help="also jax's Pallas GPU kernels and tokamax (GPU only)")
    args = parser.parse_args(argv)
    dev = jax.devices()[0]
    size = args.size or ("tiny" if dev.platform == "cpu" else "full")
    cfg = SIZES[size]
    dtype = jnp.dtype(cfg["dtype"])
    flash_impls, verify_impls = _impls()
    peak = peak_hbm_bytes_per_s(dev)
    scale = cfg["flash"][-1] ** -0.5
    up_flash, up_verify, missing = {}, {}, []
    if args.upstream and dev.platform == "gpu":
        up_flash, missing = upstream_gpu.flash_kernels(scale)
        up_verify, missing_v = upstream_gpu.verify_kernels(scale)
        missing += [m for m in missing_v if m not in missing]
    elif args.upstream:
        missing = [f"upstream kernels: GPU only (this backend is {dev.platform})"]
    failed = []
    meta = dict(provenance(), device=dev.device_kind, platform=dev.platform,
                size=size, dtype=cfg["dtype"], iters=args.iters,
                flash_shape=list(cfg["flash"]), verify_shape=list(cfg["verify"]),
                peak_hbm_bytes_per_s=peak, upstream_missing=missing)
    out = results_dir(__file__, args.out)
    flash = bench_flash(flash_impls, up_flash, *cfg["flash"], dtype, args.iters, failed)
    _write(out, meta, flash, [], failed)   # kept if the verify part is stopped
    verify = bench_verify(verify_impls, up_verify, *cfg["verify"], dtype, args.iters, peak,
                          failed)
    print(_write(out, meta, flash, verify, failed))
    ours = set(flash_impls) | set(verify_impls)
    return 1 if any(f["impl"] in ours for f in failed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
