"""Superposed Decoding (Shen et al., 2024): k drafts from one autoregressive stream per prompt.

The model runs on B rows (not B*k). Each step (as in the authors' reference code):

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
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from cadenza.decode.config import SuperposedConfig
from cadenza.decode.method import Batch, Emitted, Harvest, MethodBase
from cadenza.decode.ngram_table import (
    DeviceNgramTable,
    NgramTable,
    load_ngram_table,
    ngram_probs,
    tokenizer_fingerprint,
)
from cadenza.decode.plain import first_logits
from cadenza.errors import CadenzaError

EOS_PENALTY = 1e7  # the reference's INF: alive candidates that emitted EOS lose this much


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
               config: SuperposedConfig, max_new_tokens: int) -> SuperposedState:
    """State before the first step for right-padded prompts int32 [B, T] of lengths [B]."""
    b = prompt_tokens.shape[0]
    k, n, m = config.num_drafts, max_new_tokens, config.history_len
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


@flax.struct.dataclass
class SuperposedRun:
    """The method's state: ``out`` (progress only: ``out.step`` counts the prefill and
    steps), ``drafts`` (a :class:`SuperposedState`), the KV ``cache`` of the B
    superposed rows and the next-token ``logits`` float32 [B, V]."""

    out: Emitted
    drafts: SuperposedState
    cache: Any
    logits: jax.Array


@dataclasses.dataclass(frozen=True)
class Superposed(MethodBase):
    """Superposed Decoding as a method: ``forward``, ``config`` (the ``decode.superposed``
    section), ``eos_id`` (None: never finishes early). Params: ``(model params, device
    n-gram table or None)``. The result's tokens are each prompt's best draft; ``extras``
    hold all k ranked drafts (``tokens`` [B, k, N], ``lengths``, ``scores``,
    ``perplexities``, ``finished`` and, with a tokenizer, ``texts``)."""

    forward: Any
    config: SuperposedConfig
    eos_id: int | None
    name: str = "superposed"
    streams = False

    def model_configs(self):
        return [self.forward.config]

    def prefill(self, params, batch: Batch) -> SuperposedRun:
        """Prompts through the model once; drafts initialised from their last tokens."""
        mparams, _ = params
        logits, _, cache = first_logits(self.forward, mparams, batch)
        out = Emitted.create(batch)
        return SuperposedRun(out=out.replace(step=out.step + 1), cache=cache, logits=logits,
                             drafts=init_state(batch.tokens, batch.lengths, self.config,
                                               batch.num_new))

    def step(self, params, run: SuperposedRun) -> SuperposedRun:
        """Steps 1-6 of the module docstring, then one forward of the superposed embedding."""
        mparams, table = params
        n = run.out.num_new
        drafts, tokens, weights = superposed_step(run.drafts, run.logits, table, self.config,
                                                  self.eos_id)

        def forward(args):
            tokens, weights, cache = args
            rows = self.forward.embed(mparams, tokens)
            embeds = superpose_embeddings(rows, weights)[:, None]
            logits, _, cache = self.forward(mparams, embeddings=embeds, cache=cache)
            return logits[:, 0], cache.advance(1)

        logits, cache = jax.lax.cond(drafts.step < n, forward, lambda a: (run.logits, a[2]),
                                     (tokens, weights, run.cache))
        out = run.out
        done = jnp.broadcast_to(drafts.step >= n, out.done.shape)
        return SuperposedRun(out=out.replace(step=out.step + 1, done=done), drafts=drafts,
                             cache=cache, logits=logits)

    def harvest(self, run: SuperposedRun) -> Harvest:
        """Each prompt's best draft as its tokens; every ranked draft in ``extras``."""
        toks, lens, scores, ppl, fin = rank_drafts(run.drafts, self.config.num_drafts)
        return Harvest(tokens=toks[:, 0], logprobs=jnp.zeros(toks[:, 0].shape, jnp.float32),
                       num_generated=lens[:, 0],
                       extras={"tokens": toks, "lengths": lens, "scores": scores,
                               "perplexities": ppl, "finished": fin})

    def host_extras(self, extras: dict, tokenizer) -> dict:
        """Adds ``drafts`` [B][k] (dicts: ``token_ids``, ``perplexity``, ``finished`` and,
        with a tokenizer, ``text`` up to the first EOS) and then ``texts`` [B][k]."""
        toks, lens = extras["tokens"], extras["lengths"]
        drafts = []
        for b in range(toks.shape[0]):
            row = []
            for d in range(toks.shape[1]):
                ids = toks[b, d, :lens[b, d]].tolist()
                draft = {"token_ids": ids, "perplexity": float(extras["perplexities"][b, d]),
                         "finished": bool(extras["finished"][b, d])}
                if tokenizer is not None:
                    draft["text"] = tokenizer.decode(_until_eos(ids, self.eos_id))
                row.append(draft)
            drafts.append(row)
        extras["drafts"] = drafts
        if tokenizer is not None:
            extras["texts"] = [[d["text"] for d in row] for row in drafts]
        return extras


def superposed_method(forward, params, config, table=None, tokenizer=None):
    """``(Superposed method, its params)`` for ``config`` (a DecodeConfig); ``table`` an
    opened n-gram table (host or device) or None to open ``decode.superposed.table``.
    Raises CadenzaError before compiling on settings that cannot work."""
    sc = config.superposed
    cfg = forward.config
    if sc.num_candidates > cfg.vocab_size:
        raise CadenzaError(f"num_candidates {sc.num_candidates} exceeds the vocabulary "
                           f"({cfg.vocab_size})", where="decode.superposed.num_candidates",
                           fix="lower num_candidates")
    device_table = None
    if sc.alpha > 0:
        if table is None and sc.table:
            table = load_ngram_table(sc.table)
            check_table_tokenizer(table, tokenizer)
        if table is None:
            raise CadenzaError("alpha > 0 needs an n-gram table", where="decode.superposed.table",
                               fix="build one with `cadenza ngram build` (--ngram) or set alpha=0")
        if isinstance(table, NgramTable):
            if table.vocab_size > cfg.vocab_size:
                raise CadenzaError(f"n-gram table vocab {table.vocab_size} exceeds the model's "
                                   f"{cfg.vocab_size}",
                                   where="decode.superposed.table",
                                   fix="build the table with the model's tokenizer")
            table = table.to_device()
        device_table = table
    eos = None
    if not config.ignore_eos:
        eos = tokenizer.eos_id if tokenizer is not None else getattr(cfg, "eos_token_id", None)
    return Superposed(forward=forward, config=sc, eos_id=eos), (params, device_table)


def check_table_tokenizer(table, tokenizer) -> None:
    """Fail unless the n-gram table was built with ``tokenizer`` (or both are byte-level)."""
    made_with = table.manifest.get("tokenizer") or {}
    if tokenizer is None:
        if made_with.get("kind") != "byte-level":
            raise CadenzaError("the n-gram table was built with a tokenizer, but the model "
                               "has none", where="decode.superposed.table (--ngram)",
                               fix="build the table with --byte-level, or use a model with a "
                                   "tokenizer/ folder")
        return
    expected = tokenizer_fingerprint(tokenizer.directory)
    if made_with.get("sha256") != expected:
        raise CadenzaError(f"the n-gram table was built with another tokenizer "
                           f"({made_with or 'unknown'})", where="decode.superposed.table (--ngram)",
                           fix=f"rebuild it: cadenza ngram build --tokenizer "
                               f"{tokenizer.directory} ...")


def _until_eos(ids, eos_id: int | None) -> list[int]:
    ids = [int(i) for i in ids]
    return ids[:ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids
