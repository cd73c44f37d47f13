"""Superposed Decoding (Shen et al., 2024): k drafts from one autoregressive stream per prompt.

The model runs on B rows (not B*k). Each step (METHODS.md section 6, as in
the authors' reference code):

1. ``probs = softmax(logits / temperature)``; keep the top C and renormalise.
2. ``g[d, c] = sum_j lambda_j * P_j(c | last j tokens of draft d)`` from the
   n-gram table (:mod:`cadenza.decode.ngram_table`), only for j <= absolute position.
3. ``s = (1 - alpha) * log p + alpha * log g``; a candidate with ``g = 0`` (or
   ``p = 0``) scores -inf; a draft whose row is all -inf falls back to
   ``(1 - alpha) * log p - penalty``. ``alpha = 0`` means "n-gram off": ``s = log p``.
4. ``cand[d, c] = score[d] + s[d, c]``; the top 2k of the flattened k x C
   (first step: draft 0 only, since all drafts are equal).
5. Candidates ending in EOS join the finished pool (best k of old and new);
   the others (EOS ones at -1e7) give the new best-k alive drafts.
6. ``w = softmax(alive scores)``; the next input embedding is
   ``sum_d w_d * E[last token of d]`` (the model applies Gemma's scaling).

Output: alive and finished drafts ranked by ``exp(-score / gen_len)``
(lower is better), best k per prompt.

Choices where cadenza differs from the reference script, none changing the
ranked output: the finished pool admits only EOS candidates (the script also
admits the others at score - 1e7, which then rank last with infinite
perplexity); prompts are prefilled at once (ragged rows share one step
counter) instead of being fed token by token from the shortest prompt;
candidates are kept as the top C columns instead of a masked vocabulary row.
"""

import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cadenza.decode.ngram_table import DeviceNgramTable, NgramTable, ngram_probs
from cadenza.errors import CadenzaError
from cadenza.models.cache import KVCache
from cadenza.models.transformer import Transformer
from cadenza.validation import check_range

EOS_PENALTY = 1e7  # the reference's INF: alive candidates that emitted EOS lose this much


@dataclasses.dataclass(frozen=True)
class SuperposedConfig:
    """Superposed Decoding settings; defaults are the paper's (k = 3, C = 9, ...).

    ``ngram_weights`` are lambda for context lengths 1..J (bigram..(J+1)-gram),
    unnormalised. The paper's variants: C = 15 with alpha 0.48; up to 4-grams
    with weights (0.01, 0.04, 0.15), alpha 0.55, temperature 0.1.
    """

    num_drafts: int = 3
    num_candidates: int = 9
    temperature: float = 0.06
    alpha: float = 0.54
    ngram_weights: tuple[float, ...] = (0.01, 0.04, 0.15, 0.18, 0.12)
    penalty: float = 200.0
    max_new_tokens: int = 32

    def __post_init__(self):
        s = "superposed"
        object.__setattr__(self, "ngram_weights", tuple(float(w) for w in self.ngram_weights))
        check_range(s, "num_drafts", self.num_drafts, low=1)
        check_range(s, "num_candidates", self.num_candidates, low=1)
        check_range(s, "temperature", self.temperature, low=0.0, low_inclusive=False)
        check_range(s, "alpha", self.alpha, low=0.0, high=1.0, high_inclusive=False)
        check_range(s, "penalty", self.penalty, low=0.0)
        check_range(s, "max_new_tokens", self.max_new_tokens, low=1)
        if self.alpha > 0 and not self.ngram_weights:
            raise CadenzaError("alpha > 0 needs at least one n-gram weight",
                               where="superposed.ngram_weights",
                               fix="give weights or set alpha=0 to switch the n-gram off")
        for w in self.ngram_weights:
            check_range(s, "ngram_weights[i]", w, low=0.0)

    @property
    def history_len(self) -> int:
        """Tokens of context kept per draft for the n-gram lookup."""
        return max(len(self.ngram_weights), 1)


@flax.struct.dataclass
class SuperposedState:
    """Per-prompt draft state.

    Attributes:
      alive_tokens: int32 [B, k, N] generated tokens of the alive drafts.
      alive_scores: float32 [B, k] cumulative interpolated scores.
      history: int32 [B, k, m] last m tokens of each draft (prompt included).
      fin_tokens: int32 [B, k, N]; fin_scores float32 [B, k] (-inf = empty);
      fin_lengths: int32 [B, k] generated tokens including the EOS.
      positions: int32 [B] absolute position of the token chosen next.
      step: int32 [] tokens generated so far.
    """

    alive_tokens: jax.Array
    alive_scores: jax.Array
    history: jax.Array
    fin_tokens: jax.Array
    fin_scores: jax.Array
    fin_lengths: jax.Array
    positions: jax.Array
    step: jax.Array


def init_state(prompt_tokens: jax.Array, prompt_lengths: jax.Array,
               config: SuperposedConfig) -> SuperposedState:
    """State before the first step for right-padded prompts int32 [B, T] of lengths [B]."""
    b = prompt_tokens.shape[0]
    k, n, m = config.num_drafts, config.max_new_tokens, config.history_len
    idx = prompt_lengths[:, None] - m + jnp.arange(m)[None]
    hist = jnp.take_along_axis(prompt_tokens, jnp.clip(idx, 0, prompt_tokens.shape[1] - 1), 1)
    hist = jnp.where(idx >= 0, hist, 0)
    return SuperposedState(
        alive_tokens=jnp.zeros((b, k, n), jnp.int32),
        alive_scores=jnp.zeros((b, k), jnp.float32),
        history=jnp.broadcast_to(hist[:, None], (b, k, m)).astype(jnp.int32),
        fin_tokens=jnp.zeros((b, k, n), jnp.int32),
        fin_scores=jnp.full((b, k), -jnp.inf, jnp.float32),
        fin_lengths=jnp.zeros((b, k), jnp.int32),
        positions=prompt_lengths.astype(jnp.int32),
        step=jnp.zeros((), jnp.int32))


def candidate_scores(logits: jax.Array, state: SuperposedState, table: DeviceNgramTable | None,
                     config: SuperposedConfig) -> tuple[jax.Array, jax.Array]:
    """Steps 1-3: the top-C candidate ids int32 [B, C] and their scores s float32 [B, k, C]."""
    probs = jax.nn.softmax(logits.astype(jnp.float32) / config.temperature, axis=-1)
    top_p, top_ids = jax.lax.top_k(probs, config.num_candidates)
    logp = jnp.log(top_p / jnp.sum(top_p, axis=-1, keepdims=True))[:, None, :]
    k = config.num_drafts
    if config.alpha == 0:
        return top_ids, jnp.broadcast_to(logp, (logp.shape[0], k, logp.shape[-1]))
    cands = jnp.broadcast_to(top_ids[:, None, :], (top_ids.shape[0], k, top_ids.shape[1]))
    pos = jnp.broadcast_to(state.positions[:, None], cands.shape[:2])
    g = ngram_probs(table, state.history, pos, cands, config.ngram_weights)
    a = jnp.float32(config.alpha)
    mixed = (1 - a) * logp + a * jnp.log(g)
    all_inf = jnp.all(mixed == -jnp.inf, axis=-1, keepdims=True)
    return top_ids, jnp.where(all_inf, (1 - a) * logp - jnp.float32(config.penalty), mixed)


def superposition_weights(alive_scores: jax.Array) -> jax.Array:
    """w = softmax of the drafts' cumulative scores, float32 [B, k] (rows sum to 1)."""
    return jax.nn.softmax(alive_scores, axis=-1)


def superpose_embeddings(rows: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum_d w_d * rows[:, d]``: rows [B, k, D] (raw embeddings), weights [B, k] -> f32 [B, D]."""
    return jnp.einsum("bk,bkd->bd", weights, rows.astype(jnp.float32))


def superposed_step(state: SuperposedState, logits: jax.Array, table: DeviceNgramTable | None,
                    config: SuperposedConfig, eos_id: int | None
                    ) -> tuple[SuperposedState, jax.Array, jax.Array]:
    """One step of steps 1-6 given next-token logits float32 [B, V].

    Returns the new state, the alive drafts' last tokens int32 [B, k] and
    their superposition weights float32 [B, k].
    """
    b = logits.shape[0]
    k, c = config.num_drafts, config.num_candidates
    top_ids, s = candidate_scores(logits, state, table, config)
    width = max(k * c, 2 * k)
    pad = jnp.full((b, width - k * c), -jnp.inf, jnp.float32)
    flat = jnp.concatenate([(state.alive_scores[:, :, None] + s).reshape(b, k * c), pad], 1)
    first = jnp.concatenate([state.alive_scores[:, :1] + s[:, 0],
                             jnp.full((b, width - c), -jnp.inf, jnp.float32)], 1)
    flat = jnp.where(state.step == 0, first, flat)
    scores2, idx2 = jax.lax.top_k(flat, 2 * k)
    parent = jnp.minimum(idx2 // c, k - 1)
    tokens2 = jnp.take_along_axis(top_ids, idx2 % c, axis=1)
    seqs2 = jnp.take_along_axis(state.alive_tokens, parent[:, :, None], axis=1)
    seqs2 = jax.lax.dynamic_update_slice_in_dim(seqs2, tokens2[:, :, None], state.step, axis=2)
    hist2 = jnp.take_along_axis(state.history, parent[:, :, None], axis=1)
    hist2 = jnp.concatenate([hist2[:, :, 1:], tokens2[:, :, None]], axis=2)
    finished = (tokens2 == eos_id) if eos_id is not None else jnp.zeros(tokens2.shape, bool)

    alive_scores, keep = jax.lax.top_k(jnp.where(finished, scores2 - EOS_PENALTY, scores2), k)
    pool_scores = jnp.concatenate([state.fin_scores, jnp.where(finished, scores2, -jnp.inf)], 1)
    pool_tokens = jnp.concatenate([state.fin_tokens, seqs2], 1)
    pool_lengths = jnp.concatenate(
        [state.fin_lengths, jnp.full((b, 2 * k), state.step + 1, jnp.int32)], 1)
    fin_scores, fin_keep = jax.lax.top_k(pool_scores, k)

    new = SuperposedState(
        alive_tokens=jnp.take_along_axis(seqs2, keep[:, :, None], axis=1),
        alive_scores=alive_scores,
        history=jnp.take_along_axis(hist2, keep[:, :, None], axis=1),
        fin_tokens=jnp.take_along_axis(pool_tokens, fin_keep[:, :, None], axis=1),
        fin_scores=fin_scores,
        fin_lengths=jnp.take_along_axis(pool_lengths, fin_keep, axis=1),
        positions=state.positions + 1,
        step=state.step + 1)
    return new, new.history[:, :, -1], superposition_weights(alive_scores)


def rank_drafts(state: SuperposedState, k: int):
    """Best k of alive + finished by perplexity ``exp(-score / gen_len)`` (ascending).

    Returns tokens int32 [B, k, N], lengths int32 [B, k], scores float32
    [B, k], perplexities float32 [B, k] and finished bool [B, k].
    """
    n = state.alive_tokens.shape[-1]
    scores = jnp.concatenate([state.alive_scores, state.fin_scores], 1)
    lengths = jnp.concatenate([jnp.full_like(state.fin_lengths, n), state.fin_lengths], 1)
    mean = scores / jnp.maximum(lengths, 1).astype(jnp.float32)
    _, order = jax.lax.top_k(mean, k)  # same order as ascending exp(-mean), without overflow
    ppl = jnp.exp(-mean)
    tokens = jnp.concatenate([state.alive_tokens, state.fin_tokens], 1)
    finished = jnp.arange(2 * k)[None] >= k
    take = functools.partial(jnp.take_along_axis, indices=order, axis=1)
    return (jnp.take_along_axis(tokens, order[:, :, None], axis=1), take(lengths), take(scores),
            take(ppl), take(jnp.broadcast_to(finished, scores.shape)))


@functools.partial(jax.jit, static_argnames=("model", "config", "eos_id"))
def superposed_decode(model: Transformer, params, prompt_tokens: jax.Array,
                      prompt_lengths: jax.Array, table: DeviceNgramTable | None,
                      config: SuperposedConfig, eos_id: int | None):
    """The jitted loop: prefill, then ``lax.while_loop`` over ``config.max_new_tokens`` steps.

    Args:
      model: the Transformer module (static).
      params: its params (plain dict, not donated).
      prompt_tokens: int32 [B, T] right-padded prompts; prompt_lengths: int32 [B] >= 1.
      table: the device n-gram table, or None when ``config.alpha == 0``.

    Returns ``(rank_drafts(...) outputs, final state)``. One KV stream of B rows.
    """
    b, t = prompt_tokens.shape
    n = config.max_new_tokens
    variables = {"params": params}
    cache = KVCache.create(model.config, b, t + n)
    logits, _, cache = model.apply(variables, prompt_tokens, cache=cache)
    cache = cache.with_lengths(prompt_lengths)
    logits = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]

    def forward(args):
        tokens, weights, cache = args
        rows = model.apply(variables, tokens, method=Transformer.embed_tokens)
        embeds = superpose_embeddings(rows, weights)[:, None]
        logits, _, cache = model.apply(variables, embeddings=embeds, cache=cache)
        return logits[:, 0], cache.advance(1)

    def body(carry):
        state, cache, logits = carry
        state, tokens, weights = superposed_step(state, logits, table, config, eos_id)
        logits, cache = jax.lax.cond(state.step < n, forward, lambda a: (logits, a[2]),
                                     (tokens, weights, cache))
        return state, cache, logits

    state = init_state(prompt_tokens, prompt_lengths, config)
    state, _, _ = jax.lax.while_loop(lambda c: c[0].step < n, body, (state, cache, logits))
    return rank_drafts(state, config.num_drafts), state


@dataclasses.dataclass
class SuperposedOutput:
    """Ranked drafts per prompt (best first).

    tokens: int32 [B, k, N] (valid up to ``lengths``); lengths: generated
    tokens per draft (an EOS included for finished drafts); scores:
    cumulative interpolated scores (-inf: fewer than k drafts exist);
    perplexities: ``exp(-score / length)``; finished: ended by EOS;
    texts: decoded drafts (up to the first EOS) when a tokenizer was given.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    scores: np.ndarray
    perplexities: np.ndarray
    finished: np.ndarray
    texts: list[list[str]] | None = None


def superposed_generate(model: Transformer, params, prompts: Sequence[Sequence[int]],
                        table: NgramTable | DeviceNgramTable | None,
                        config: SuperposedConfig = SuperposedConfig(), *,
                        eos_id: int | None = None, pad_id: int = 0,
                        tokenizer=None) -> SuperposedOutput:
    """Superposed Decoding of ragged ``prompts`` (token-id lists): k ranked drafts each.

    ``table`` is an opened n-gram table (host or device); it may be None
    only with ``config.alpha == 0``. ``eos_id`` defaults to the model config's
    ``eos_token_id``. ``tokenizer`` (anything with ``decode(ids) -> str``)
    adds ``texts``. Validation happens before compiling.
    """
    cfg = model.config
    if eos_id is None:
        eos_id = getattr(cfg, "eos_token_id", None)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise CadenzaError("every prompt needs at least one token", where="superposed decoding",
                           fix="encode prompts with a BOS token or drop empty ones")
    if config.num_candidates > cfg.vocab_size:
        raise CadenzaError(f"num_candidates {config.num_candidates} exceeds the vocabulary "
                           f"({cfg.vocab_size})", where="superposed decoding",
                           fix="lower num_candidates")
    device_table = None
    if config.alpha > 0:
        if table is None:
            raise CadenzaError("alpha > 0 needs an n-gram table", where="superposed decoding",
                               fix="build one with `cadenza ngram build` or set alpha=0")
        if isinstance(table, NgramTable):
            if table.vocab_size > cfg.vocab_size:
                raise CadenzaError(f"n-gram table vocab {table.vocab_size} exceeds the model's "
                                   f"{cfg.vocab_size}", where="superposed decoding",
                                   fix="build the table with the model's tokenizer")
            table = table.to_device()
        device_table = table
    width = max(len(p) for p in prompts)
    if width + config.max_new_tokens > cfg.max_position_embeddings:
        raise CadenzaError(f"prompt ({width}) + max_new_tokens ({config.max_new_tokens}) exceeds "
                           f"max_position_embeddings {cfg.max_position_embeddings}",
                           where="superposed decoding", fix="shorten the prompt or max_new_tokens")
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    (toks, lens, scores, ppl, fin), _ = superposed_decode(
        model, params, jnp.asarray(tokens), jnp.asarray(lengths), device_table, config, eos_id)
    out = SuperposedOutput(*(np.asarray(x) for x in (toks, lens, scores, ppl, fin)))
    if tokenizer is not None:
        out.texts = [[tokenizer.decode(_until_eos(out.tokens[b, d, :out.lengths[b, d]], eos_id))
                      for d in range(out.tokens.shape[1])] for b in range(out.tokens.shape[0])]
    return out


def _until_eos(ids: np.ndarray, eos_id: int | None) -> list[int]:
    ids = [int(i) for i in ids]
    return ids[:ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids
