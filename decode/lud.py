"""Lexical Unit Decoding (LUD): parallel decoding of confident spans (METHODS.md section 7.4).

Each step feeds, per row, ``[pending real tokens (1..m+1, padded to m+1), m placeholders]``
(W = 2m + 1 slots) on top of the KV cache, which holds every committed real token:

- The last pending token gives t_0 = argmax (always kept: plain greedy decoding).
- Placeholder j (1..m) gives t_j = argmax with confidence c_j = its top probability.
  t_1..t_J are accepted for the largest J with every c_j >= beta, and, with
  ``cut_repeats``, no t_j equal to t_{j-1}.
- The pending tokens are committed (``lengths += pending count``); [t_0..t_J] become the
  next step's pending tokens. Placeholder and padding K/V are written past the new
  lengths, so they are dropped for free and never seen again.

Slot layout and mask (bool [B, W, W]): pending slot i (0..m) has position L + i and sees
valid pending slots i' <= i (slots >= the pending count are padding, seen by no one);
placeholder slot m + j has position L + p - 1 + j (p = pending count; the position the
token it predicts would be fed at, as in training) and sees the valid pending slots and
placeholders j' <= j. Real tokens never see placeholders, so t_0 is exactly the greedy
token: beta > 1 or m = 0 gives greedy decoding.

[choices] Only greedy t_0 (no sampling); EOS ends a row at the first EOS among the
accepted tokens; accepted tokens past ``max_new_tokens`` are cut; accepted placeholder
tokens are not verified (lossy, as in the paper); the optional lossless mode of
METHODS 7.5 is not built. Prompts are right-padded and prefilled at once; all but each
prompt's last token are committed, the last one is the first pending token.
"""

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cadenza.errors import CadenzaError
from cadenza.models.cache import KVCache
from cadenza.models.transformer import Transformer


@flax.struct.dataclass
class LudResult:
    """LUD output.

    Attributes:
      tokens: int32 [B, max_new_tokens] generated tokens (``pad_id`` after ``num_tokens``).
      num_tokens: int32 [B] generated tokens per row (an EOS counts and ends the row).
      steps: int32 [B] model calls per row after the prefill.
      cache: the final KVCache: slots below ``lengths`` hold exactly the committed real
        tokens (prompt and generated; the last pending tokens are not committed).
    """

    tokens: jax.Array
    num_tokens: jax.Array
    steps: jax.Array
    cache: KVCache

    def tokens_per_step(self) -> float:
        """Mean generated tokens per model call over all rows (1.0 = greedy)."""
        return float(np.sum(self.num_tokens)) / max(float(np.sum(self.steps)), 1.0)


def _step_mask(p: jax.Array, m: int) -> jax.Array:
    """bool [B, W, W] visibility among the W = 2m + 1 new slots (pending count ``p`` [B])."""
    w = 2 * m + 1
    idx = jnp.arange(w)
    is_ph = idx > m
    valid_real = (idx[None, :] < p[:, None]) & ~is_ph[None, :]              # [B, W] keys
    causal = idx[:, None] >= idx[None, :]
    ph_pair = is_ph[:, None] & is_ph[None, :] & causal                       # [W, W]
    real_q = ~is_ph[:, None] & causal                                        # [W, W]
    see_real = (real_q | is_ph[:, None])[None] & valid_real[:, None, :]
    return see_real | ph_pair[None]


def accepted_count(cand: jax.Array, conf: jax.Array, beta, cut_repeats: bool) -> jax.Array:
    """How many of ``cand`` [B, m + 1] = [t_0, t_1..t_m] a step keeps: int32 [B] = 1 + J.

    J is the largest j with every c_1..c_j >= beta (``conf`` [B, m]) and, with
    ``cut_repeats``, no t_i (i <= j) equal to t_{i-1}.
    """
    ok = conf >= beta
    if cut_repeats:
        ok = ok & (cand[:, 1:] != cand[:, :-1])
    return 1 + jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)


@functools.partial(jax.jit, static_argnames=("model_config", "max_new_tokens", "lookahead",
                                             "cut_repeats", "eos_id", "pad_id",
                                             "placeholder_id"))
def _lud_decode(params, prompt, prompt_lengths, beta, *, model_config, max_new_tokens: int,
                lookahead: int, cut_repeats: bool, eos_id: int | None,
                pad_id: int, placeholder_id: int) -> LudResult:
    model = Transformer(model_config)
    b, plen = prompt.shape
    m = lookahead
    w = 2 * m + 1
    cache = KVCache.create(model_config, b, plen + max_new_tokens + w)
    _, _, cache = model.apply({"params": params}, prompt, cache=cache)
    cache = cache.with_lengths(prompt_lengths - 1)
    last = jnp.take_along_axis(prompt, (prompt_lengths - 1)[:, None], axis=1)[:, 0]
    pending = jnp.full((b, m + 1), pad_id, jnp.int32).at[:, 0].set(last)
    out = jnp.full((b, max_new_tokens + m + 1), pad_id, jnp.int32)
    zeros = jnp.zeros((b,), jnp.int32)
    init = (cache, pending, jnp.ones((b,), jnp.int32), out, zeros, zeros,
            jnp.zeros((b,), bool))
    slot = jnp.arange(m + 1)

    def body(state):
        cache, pending, p, out, n, steps, done = state
        ph = jnp.full((b, m), placeholder_id, jnp.int32)
        tokens = jnp.concatenate([pending, ph], axis=1)
        lengths = cache.lengths[:, None]
        positions = jnp.concatenate(
            [lengths + slot[None], lengths + p[:, None] - 1 + jnp.arange(1, m + 1)[None]], axis=1)
        logits, _, new_cache = model.apply({"params": params}, tokens, positions=positions,
                                           attention_mask=_step_mask(p, m), cache=cache)
        t0 = jnp.argmax(jnp.take_along_axis(logits, (p - 1)[:, None, None], axis=1)[:, 0],
                        axis=-1).astype(jnp.int32)
        ph_logits = logits[:, m + 1:]
        t_ph = jnp.argmax(ph_logits, axis=-1).astype(jnp.int32)               # [B, m]
        conf = jnp.max(jax.nn.softmax(ph_logits, axis=-1), axis=-1)
        cand = jnp.concatenate([t0[:, None], t_ph], axis=1)                   # [B, m + 1]
        count = accepted_count(cand, conf, beta, cut_repeats)
        finished = jnp.zeros((b,), bool)
        if eos_id is not None:
            is_eos = (cand == eos_id) & (slot[None] < count[:, None])
            first_eos = jnp.argmax(is_eos, axis=1)
            has_eos = jnp.any(is_eos, axis=1)
            count = jnp.where(has_eos, first_eos + 1, count)
            finished = has_eos
        count = jnp.minimum(count, max_new_tokens - n)
        finished = finished | (n + count >= max_new_tokens)
        active = ~done
        written = jax.vmap(lambda o, c, s: jax.lax.dynamic_update_slice(o, c, (s,)))(
            out, jnp.where(slot[None] < count[:, None], cand, pad_id), n)
        keep = active[:, None]
        new_cache = new_cache.with_lengths(cache.lengths + jnp.where(active, p, 0))
        return (new_cache, jnp.where(keep, cand, pending), jnp.where(active, count, p),
                jnp.where(keep, written, out), n + jnp.where(active, count, 0),
                steps + active, done | finished)

    cache, _, _, out, n, steps, _ = jax.lax.while_loop(
        lambda s: ~jnp.all(s[-1]), body, init)
    return LudResult(tokens=out[:, :max_new_tokens], num_tokens=n, steps=steps, cache=cache)


def lud_generate(model, params, prompts: Sequence[Sequence[int]], lud, *,
                 max_new_tokens: int, eos_id: int | None = None, pad_id: int = 0
                 ) -> LudResult:
    """Lexical Unit Decoding of a batch of prompts (one jitted prefill + ``while_loop``).

    Args:
      model: a :class:`~cadenza.models.Transformer` or its ModelConfig (the model must be
        LUD-fine-tuned for placeholders to be useful; any model gives greedy output with
        ``lud.beta > 1`` or ``lookahead=0``).
      params: the model params.
      prompts: B token-id lists (ragged; each at least one token).
      lud: the :class:`~cadenza.decode.lud_config.LudConfig` (``lookahead`` m, ``beta``,
        ``cut_repeats``, ``placeholder_id``).
      max_new_tokens: tokens to generate per row (fewer if the row emits ``eos_id``).
      eos_id: the end-of-sequence id, or None to always generate ``max_new_tokens``.
      pad_id: filler of ``tokens`` past each row's end.

    Returns a :class:`LudResult`; ``result.tokens_per_step()`` is the speed-up statistic.
    Raises CadenzaError (before compiling) on empty or out-of-vocabulary prompts, when
    the longest prompt + ``max_new_tokens`` + ``lookahead`` exceeds the model's positions,
    or on an invalid placeholder id.
    Compiles once per (batch, longest prompt, max_new_tokens, lookahead, cut_repeats, ids);
    ``beta`` is a traced argument (sweeping it does not recompile).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise CadenzaError("every prompt needs at least one token", where="lud_generate",
                           fix="pass non-empty token-id lists (e.g. start with BOS)")
    if max_new_tokens < 1:
        raise CadenzaError(f"max_new_tokens={max_new_tokens} must be >= 1",
                           where="lud_generate", fix="ask for at least one token")
    model_config = model.config if isinstance(model, Transformer) else model
    lengths = np.array([len(p) for p in prompts], np.int32)
    if any(not 0 <= int(t) < model_config.vocab_size for p in prompts for t in p):
        raise CadenzaError(f"a prompt token is outside the vocabulary "
                           f"(0..{model_config.vocab_size - 1})", where="lud_generate",
                           fix="encode prompts with the model's tokenizer")
    need = int(lengths.max()) + max_new_tokens + lud.lookahead
    if need > model_config.max_position_embeddings:
        raise CadenzaError(f"the longest prompt + max_new_tokens + lookahead = {need} exceeds "
                           f"max_position_embeddings={model_config.max_position_embeddings}",
                           where="lud_generate", fix="shorten the prompt or generate fewer tokens")
    padded = np.full((len(prompts), int(lengths.max())), pad_id, np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    return _lud_decode(params, jnp.asarray(padded), jnp.asarray(lengths),
                       jnp.float32(lud.beta), model_config=model_config,
                       max_new_tokens=max_new_tokens, lookahead=lud.lookahead,
                       cut_repeats=lud.cut_repeats, eos_id=eos_id, pad_id=pad_id,
                       placeholder_id=lud.placeholder_for(model_config))
