"""``cadenza demo``: a short end-to-end run on CPU — init, train, generate.

A stand-in for ``cadenza quickstart`` until that lands: it builds the tiny
preset, trains it for a few hundred steps on byte-tokenised source files of
the running Python's standard library (nothing is downloaded), then greedily
continues a prompt with the KV cache. Byte ids are shifted by 3 so that 0, 1
and 2 stay pad, BOS and EOS. It writes the resolved config and a
``metrics.jsonl`` under ``out_dir``.
"""

import json
import pathlib
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from cadenza.config import load_config, to_yaml
from cadenza.models import KVCache, Transformer, init_params

_BYTE_OFFSET = 3
_DEMO_MODULES = ("textwrap.py", "string/__init__.py", "bisect.py", "heapq.py", "fnmatch.py",
                 "colorsys.py", "shlex.py", "glob.py")


def _corpus() -> np.ndarray:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    text = b"".join((root / m).read_bytes() for m in _DEMO_MODULES if (root / m).is_file())
    return np.frombuffer(text, np.uint8).astype(np.int32) + _BYTE_OFFSET


def _decode_bytes(ids) -> str:
    return bytes(int(i) - _BYTE_OFFSET for i in ids if i >= _BYTE_OFFSET).decode("utf-8", "replace")


def run_demo(steps: int = 300, out_dir: str = "runs/demo", batch: int = 8, seq_len: int = 128,
             prompt: str = "def ", new_tokens: int = 48) -> dict:
    """Train the tiny preset on stdlib bytes for ``steps`` steps, then generate.

    Returns a summary dict: ``first_loss``, ``last_loss`` and the generated ``text``.
    """
    config = load_config(None, [f"train.steps={steps}", f"train.output_dir={out_dir}"],
                         preset="tiny")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(config))
    cfg = config.model
    model = Transformer(cfg)
    params = init_params(cfg, jax.random.key(config.train.seed))
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, steps), weight_decay=0.01)
    opt_state = opt.init(params)

    def loss_fn(p, tokens):
        logits, _, _ = model.apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(p, s, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    data = _corpus()
    rng = np.random.default_rng(config.train.seed)
    losses = []
    with open(out / "metrics.jsonl", "w") as metrics:
        for i in tqdm(range(steps), desc="demo: training tiny model", unit="step"):
            starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
            tokens = jnp.asarray(np.stack([data[s:s + seq_len + 1] for s in starts]))
            params, opt_state, loss = step(params, opt_state, tokens)
            if i % 10 == 0 or i == steps - 1:
                losses.append(float(loss))
                metrics.write(json.dumps({"step": i, "loss": losses[-1]}) + "\n")

    prompt_ids = np.frombuffer(prompt.encode(), np.uint8).astype(np.int32) + _BYTE_OFFSET
    t0 = time.perf_counter()
    ids = np.asarray(_greedy(model, params, jnp.asarray(prompt_ids)[None], new_tokens))[0]
    elapsed = time.perf_counter() - t0
    text = _decode_bytes(ids)
    print(f"loss: {losses[0]:.3f} -> {losses[-1]:.3f} over {steps} steps")
    print(f"greedy continuation of {prompt!r} ({new_tokens} tokens, {elapsed:.2f}s incl. compile):")
    print(prompt + text)
    return {"first_loss": losses[0], "last_loss": losses[-1], "text": text}


def _greedy(model, params, prompt, new_tokens: int):
    """Greedy decoding with the KV cache: one prefill, then a ``lax.fori_loop`` of single steps."""
    b, t = prompt.shape
    cache = KVCache.create(model.config, b, t + new_tokens)

    @jax.jit
    def run(params, prompt, cache):
        logits, _, cache = model.apply({"params": params}, prompt, cache=cache)
        cache = cache.advance(t)
        first = jnp.argmax(logits[:, -1], axis=-1)
        out = jnp.zeros((b, new_tokens), jnp.int32).at[:, 0].set(first)

        def body(i, carry):
            out, cache = carry
            last = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
            logits, _, cache = model.apply({"params": params}, last,
                                          cache=cache)
            cache = cache.advance(1)
            return out.at[:, i].set(jnp.argmax(logits[:, -1], axis=-1)), cache

        out, _ = jax.lax.fori_loop(1, new_tokens, body, (out, cache))
        return out

    return run(params, prompt, cache)
