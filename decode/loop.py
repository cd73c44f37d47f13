"""The decoding loop: one jitted prefill, then a jitted ``lax.while_loop`` of decode steps.

``generate(model, params, prompts, config)`` runs on device with static
shapes and no host round trip per token:

1. **Prefill** (one jit): the prompts, right-padded to a common length ``T``, go
   through the model in one call that writes their keys/values into a
   freshly allocated :class:`~cadenza.models.KVCache` of ``max_len`` slots
   per row; ``cache.with_lengths(prompt_lengths)`` then hides the padding,
   and the first token is drawn from the logits at each row's last prompt
   position.
2. **Decode** (one jit, state donated): a ``lax.while_loop`` feeds each
   row's last token (the "pending" token, not yet cached) at position
   ``lengths[b]``, advances only unfinished rows, and draws the next token.
   A finished row keeps computing (static shapes) but its cache length
   stays put and its outputs are masked. The loop exits when every row is
   done or ``max_new_tokens`` tokens exist.

Stop token ids end a row on device. Stop strings are matched on the host on
decoded text (:mod:`cadenza.decode.text`): with stop strings (or when
streaming) the loop runs in chunks of ``chunk_steps`` steps, carrying its
state on device; after each chunk the host decodes the new tokens, marks
rows that produced a stop string done, and truncates them there.

Proxy-tuning / EFT (:class:`ProxyTuning`): the base, expert and anti-expert
models decode in lockstep in the same loop, each with its own params and
cache; the next-token logits are ``base + alpha * (expert - anti)``, then
the usual processing. (EFT's ``log p_base + beta (log p_ft - log p_pre)``,
renormalised, is the same distribution with ``alpha = beta``: per-row
log-normalisers are constants that cancel in the softmax.)

Compiled programs are cached per (model configs, sampling spec, shapes);
prompt lengths are padded to a multiple of 16, and stop ids, seeds and
``proxy_alpha`` are traced values, so nearby calls share one program. Stats
report compile time separately from prefill and decode time.
"""

import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cadenza.decode import sampling
from cadenza.decode.config import DecodeConfig, SamplingSpec
from cadenza.decode.text import RowText, StopMatch, stable_prefix_length
from cadenza.errors import CadenzaError
from cadenza.models.cache import KVCache
from cadenza.models.params import decode_layout
from cadenza.models.transformer import Transformer

_FILL = 0     # token id written in a finished row's output slots (never returned)
_PROMPT_BUCKET = 16
_STOP_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class ProxyTuning:
    """Partners for proxy-tuning / EFT: ``logits = base + alpha * (expert - anti)``.

    ``expert`` is the small tuned model, ``anti`` the small untuned one; both
    must share the base model's vocabulary (and tokenizer). ``alpha`` is
    ``DecodeConfig.proxy_alpha``.
    """

    expert: Transformer
    expert_params: Any
    anti: Transformer
    anti_params: Any


@dataclasses.dataclass
class GenerateResult:
    """What :func:`generate` returns, one entry per prompt.

    ``token_ids``: generated ids (prompt excluded), including a final stop
    token id, cut after the token completing a stop string.
    ``text``: the generated text (tokenizer given), stop token and stop string
    excluded. ``logprobs``: log-probability of each returned token under the
    distribution it was chosen from (after repetition penalty and warpers).
    ``finish_reasons``: ``"stop_token"``, ``"stop_string"`` or ``"length"``.
    ``stats``: prompt/generated token counts, ``compile_s``, ``prefill_s``,
    ``decode_s``, ``decode_tokens_per_s``, ``steps`` (decode loop
    iterations), ``chunks`` (host syncs after prefill), ``batch``, ``max_len``.
    """

    token_ids: list[list[int]]
    text: list[str] | None
    logprobs: list[list[float]]
    finish_reasons: list[str]
    stats: dict


@dataclasses.dataclass
class StreamChunk:
    """One host sync of :func:`stream`: what each row produced since the previous chunk.

    ``token_ids[b]``: new ids of row b (cut at a stop string); ``text[b]``:
    new text that is final (text that may begin a stop string is held back
    until it is resolved); ``finished[b]``: whether row b is done.
    ``result`` is set on the last chunk only.
    """

    step: int
    token_ids: list[list[int]]
    text: list[str] | None
    finished: list[bool]
    result: GenerateResult | None = None


@flax.struct.dataclass
class DecodeState:
    """The loop carry (all on device).

    tokens: int32 [B, N] generated ids (``N = max_new_tokens``), slot ``step``
      is written next; logprobs: float32 [B, N]; num_generated: int32 [B];
    done: bool [B]; step: int32 scalar (tokens produced per unfinished row);
    caches: one KVCache per model (lengths = cached tokens; the last
      generated token is pending, not yet cached);
    seen: bool [B, V] prompt + generated tokens (repetition penalty) or None;
    keys: per-row PRNG keys [B] (sampling) or None;
    stop_ids: int32 [S] token ids that end a row (padded with -1).
    """

    tokens: jax.Array
    logprobs: jax.Array
    num_generated: jax.Array
    done: jax.Array
    step: jax.Array
    caches: tuple
    seen: jax.Array | None
    keys: jax.Array | None
    stop_ids: jax.Array


@dataclasses.dataclass(frozen=True)
class _Program:
    """Static description of one compiled loop (hashable: the compile-cache key)."""

    model_configs: tuple
    spec: SamplingSpec
    num_new: int
    max_len: int
    rules: Any

    def _apply(self, i, params, tokens, cache):
        model = Transformer(self.model_configs[i])
        with nn.logical_axis_rules(self.rules or ()):
            return model.apply({"params": params}, tokens, cache=cache)

    def _emit(self, state: DecodeState, logits) -> DecodeState:
        """Choose token ``state.step`` for unfinished rows from combined logits [B, V]."""
        logp = sampling.log_probs(logits, self.spec, state.seen)
        tok, lp = sampling.select(logp, self.spec, state.keys, state.step)
        active = ~state.done
        tok = jnp.where(active, tok, _FILL)
        lp = jnp.where(active, lp, 0.0)
        tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, tok[:, None], state.step, 1)
        logprobs = jax.lax.dynamic_update_slice_in_dim(state.logprobs, lp[:, None], state.step, 1)
        seen = state.seen
        if seen is not None:
            seen = seen | (jax.nn.one_hot(tok, seen.shape[-1], dtype=bool) & active[:, None])
        stopped = jnp.any(tok[:, None] == state.stop_ids[None, :], axis=-1)
        step = state.step + 1
        return state.replace(
            tokens=tokens, logprobs=logprobs, seen=seen, step=step,
            num_generated=jnp.where(active, step, state.num_generated),
            done=state.done | (active & stopped) | (step >= self.num_new))

    @staticmethod
    def _combine(logits, alpha):
        if len(logits) == 1:
            return logits[0]
        base, expert, anti = logits
        return base + alpha * (expert - anti)

    def prefill(self, params, alpha, tokens, lengths, seeds, stop_ids) -> DecodeState:
        """Prompts int32 [B, T] (right-padded), lengths int32 [B], seeds int32 [B],
        stop_ids int32 [S] (-1 = none) -> state with the first token chosen."""
        b, t = tokens.shape
        caches, last_logits = [], []
        for i, p in enumerate(params):
            cache = KVCache.create(self.model_configs[i], b, self.max_len)
            logits, _, cache = self._apply(i, p, tokens, cache)
            caches.append(cache.with_lengths(lengths))
            last_logits.append(
                jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0])
        vocab = last_logits[0].shape[-1]
        seen = None
        if self.spec.uses_history:
            valid = jnp.arange(t)[None, :] < lengths[:, None]
            seen = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], tokens].max(valid)
        keys = sampling.row_keys(seeds) if self.spec.method == "sample" else None
        state = DecodeState(
            tokens=jnp.full((b, self.num_new), _FILL, jnp.int32),
            logprobs=jnp.zeros((b, self.num_new), jnp.float32),
            num_generated=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
            step=jnp.zeros((), jnp.int32), caches=tuple(caches), seen=seen, keys=keys,
            stop_ids=stop_ids)
        return self._emit(state, self._combine(last_logits, alpha))

    def decode(self, params, alpha, state: DecodeState, until) -> DecodeState:
        """Run decode steps while ``step < until`` and some row is unfinished."""

        def cond(s):
            return (s.step < until) & ~jnp.all(s.done)

        def body(s):
            pending = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)
            keep = (~s.done).astype(jnp.int32)
            caches, logits = [], []
            for i, p in enumerate(params):
                lg, _, cache = self._apply(i, p, pending, s.caches[i])
                caches.append(cache.advance(keep))
                logits.append(lg[:, 0])
            return self._emit(s.replace(caches=tuple(caches)), self._combine(logits, alpha))

        return jax.lax.while_loop(cond, body, state)


_COMPILED: dict = {}
_MAX_COMPILED = 32


def _compiled(program: _Program, name: str, mesh, args, donate=()):
    """AOT-compile ``program.<name>`` for ``args``' shapes (cached). Returns (fn, seconds)."""
    leaves, treedef = jax.tree.flatten(args)
    sig = tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)
    key = (program, name, mesh, treedef, sig)
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    jitted = jax.jit(getattr(program, name), donate_argnums=donate)
    if mesh is not None:
        with jax.set_mesh(mesh):
            fn = jitted.lower(*args).compile()
    else:
        fn = jitted.lower(*args).compile()
    if len(_COMPILED) >= _MAX_COMPILED:
        _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = fn
    return fn, time.perf_counter() - t0


def _prompt_ids(prompts, tokenizer, vocab: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise CadenzaError("prompts must be a list of strings or of token-id lists",
                           where="generate(prompts=...)", fix="wrap a single prompt in a list")
    if not prompts:
        raise CadenzaError("no prompts given", where="generate(prompts=...)",
                           fix="pass at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise CadenzaError(f"prompt {i} is text but there is no tokenizer",
                                   where="generate(prompts=...)",
                                   fix="pass tokenizer=..., or give token ids instead of text")
            ids = tokenizer.encode(p, add_bos=True)
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise CadenzaError(f"prompt {i} is empty", where="generate(prompts=...)",
                               fix="give at least one token (e.g. the BOS id)")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise CadenzaError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): "
                               f"{bad[:5]}", where="generate(prompts=...)",
                               fix="use ids of this model's tokenizer")
        out.append(ids)
    return out


def _check_models(models, config: DecodeConfig, longest: int) -> tuple[int, int]:
    """Validate shapes before compiling; returns (padded prompt length, cache slots per row).

    Prompts are right-padded to a multiple of ``_PROMPT_BUCKET`` (within the
    limits) so that nearby prompt lengths share one compiled program.
    """
    vocabs = [m.config.vocab_size for m in models]
    if len(set(vocabs)) > 1:
        raise CadenzaError(
            f"proxy-tuning models disagree on the vocabulary: base {vocabs[0]}, expert "
            f"{vocabs[1]}, anti-expert {vocabs[2]}", where="generate(proxy=...)",
            fix="use an expert and anti-expert that share the base model's tokenizer")
    if config.top_k > vocabs[0]:
        raise CadenzaError(f"top_k={config.top_k} exceeds the vocabulary size {vocabs[0]}",
                           where="decode.top_k", fix=f"use top_k <= {vocabs[0]} (0 = off)")
    n_new = config.max_new_tokens
    need = longest + n_new
    if config.max_len and need > config.max_len:
        raise CadenzaError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens ({n_new}) needs "
            f"{need} cache slots but max_len is {config.max_len}",
            where="decode.max_len", fix="raise decode.max_len or shorten the prompt / output")
    mpe = min(m.config.max_position_embeddings for m in models)
    if need > mpe:
        raise CadenzaError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens ({n_new}) exceeds "
            f"max_position_embeddings={mpe}",
            where="decode.max_new_tokens", fix="shorten the prompt or lower max_new_tokens")
    limit = min(config.max_len or mpe, mpe)
    padded = min(-(-longest // _PROMPT_BUCKET) * _PROMPT_BUCKET, limit - n_new)
    return padded, config.max_len or padded + n_new


def _stop_ids(model, config: DecodeConfig, tokenizer) -> tuple[int, ...]:
    ids = list(config.stop_token_ids)
    if not config.ignore_eos:
        eos = tokenizer.eos_id if tokenizer is not None else model.config.eos_token_id
        if eos is not None:
            ids.append(eos)
    vocab = model.config.vocab_size
    bad = [t for t in ids if t >= vocab]
    if bad:
        raise CadenzaError(f"stop token ids {bad} are outside the vocabulary [0, {vocab})",
                           where="decode.stop_token_ids", fix="use ids of this model's tokenizer")
    return tuple(sorted(set(ids)))


def stream(model: Transformer, params, prompts, config: DecodeConfig | None = None, *,
           tokenizer=None, seeds=None, proxy: ProxyTuning | None = None,
           chunk_steps: int | None = None, mesh=None, rules=None) -> Iterator[StreamChunk]:
    """Generate like :func:`generate`, yielding to the host every ``chunk_steps`` decode steps.

    The first chunk follows prefill (one token per row); each later chunk
    runs up to ``chunk_steps`` (default ``config.chunk_steps``) steps on
    device. The last chunk carries the :class:`GenerateResult`, identical
    to what :func:`generate` returns for the same inputs.
    """
    config = config or DecodeConfig()
    return _run(model, params, prompts, config, tokenizer=tokenizer, seeds=seeds, proxy=proxy,
                chunk_steps=chunk_steps or config.chunk_steps, mesh=mesh, rules=rules)


def generate(model: Transformer, params, prompts, config: DecodeConfig | None = None, *,
             tokenizer=None, seeds=None, proxy: ProxyTuning | None = None, mesh=None,
             rules=None) -> GenerateResult:
    """Decode continuations of a ragged batch of prompts on device.

    Args:
      model: a :class:`~cadenza.models.Transformer`; params: its params
        (plain dict; sharded params work with ``mesh`` and logical ``rules``).
      prompts: a list of strings (needs ``tokenizer``, encoded with BOS) or
        of token-id lists; lengths may differ.
      config: :class:`DecodeConfig` (method, sampling, stops, max_new_tokens).
      tokenizer: ``encode(text, add_bos=)``/``decode(ids)``/``eos_id``; gives
        ``text`` and enables stop strings.
      seeds: one int per prompt (default ``config.seed + i``); a row's
        samples depend only on its seed, prompt and settings.
      proxy: :class:`ProxyTuning` partners (proxy-tuning / EFT).

    Raises CadenzaError, before compiling, on empty or out-of-vocabulary
    prompts, a prompt plus ``max_new_tokens`` beyond the cache or the model's
    ``max_position_embeddings``, ``top_k`` beyond the vocabulary, stop
    strings without a tokenizer, or proxy models with another vocabulary.
    """
    config = config or DecodeConfig()
    chunk = config.chunk_steps if config.stop else None
    result = None
    for c in _run(model, params, prompts, config, tokenizer=tokenizer, seeds=seeds, proxy=proxy,
                  chunk_steps=chunk, mesh=mesh, rules=rules):
        result = c.result
    return result


class _Rows:
    """Host-side view of every row: tokens pulled so far, stop strings, streamed deltas."""

    def __init__(self, prompts, stop_ids, stops, tokenizer):
        b = len(prompts)
        self.stop_ids, self.stops = set(stop_ids), list(stops)
        self.texts = [RowText(tokenizer, p) for p in prompts] if tokenizer is not None else None
        self.ids = [[] for _ in range(b)]
        self.logprobs = [[] for _ in range(b)]
        self.reasons: list[str | None] = [None] * b
        self.matches: list[StopMatch | None] = [None] * b
        self.sent_tokens = [0] * b
        self.sent_chars = [0] * b

    @property
    def all_finished(self) -> bool:
        return all(r is not None for r in self.reasons)

    def pull(self, state: DecodeState, lo: int, hi: int) -> np.ndarray:
        """Fetch slots ``[lo, hi)`` of every row; returns the mask of rows newly stopped
        by a stop string (the device does not know yet)."""
        tokens = np.asarray(state.tokens[:, lo:hi])
        logprobs = np.asarray(state.logprobs[:, lo:hi])
        num = np.asarray(state.num_generated)
        done = np.asarray(state.done)
        stopped = np.zeros(len(self.ids), bool)
        for r in range(len(self.ids)):
            if self.reasons[r] is not None:
                continue
            n = max(0, min(hi, int(num[r])) - lo)
            self.ids[r] += tokens[r, :n].tolist()
            self.logprobs[r] += logprobs[r, :n].tolist()
            if done[r]:
                self.reasons[r] = ("stop_token" if self.ids[r] and self.ids[r][-1] in self.stop_ids
                                   else "length")
            if self.stops and n:
                match = self.texts[r].find_stop(self._body(r), self.stops)
                if match is not None:
                    self.ids[r] = self.ids[r][:match.num_tokens]
                    self.logprobs[r] = self.logprobs[r][:match.num_tokens]
                    self.matches[r] = match
                    stopped[r] = self.reasons[r] is None
                    self.reasons[r] = "stop_string"
        return stopped

    def _body(self, r) -> list[int]:
        """Row r's ids without a final stop token (what its text is made of)."""
        if self.reasons[r] == "stop_token":
            return self.ids[r][:-1]
        return self.ids[r]

    def text(self, r) -> str:
        if self.matches[r] is not None:
            return self.matches[r].text
        return self.texts[r].text(self._body(r))

    def chunk(self, step: int) -> StreamChunk:
        """What each row produced since the last chunk (text only as far as it is final)."""
        new_ids, new_text = [], [] if self.texts is not None else None
        for r in range(len(self.ids)):
            new_ids.append(self.ids[r][self.sent_tokens[r]:])
            self.sent_tokens[r] = len(self.ids[r])
            if new_text is not None:
                text = self.text(r)
                end = stable_prefix_length(text, self.stops, self.reasons[r] is not None)
                new_text.append(text[self.sent_chars[r]:end])
                self.sent_chars[r] = max(self.sent_chars[r], end)
        return StreamChunk(step=step, token_ids=new_ids, text=new_text,
                           finished=[r is not None for r in self.reasons])

    def result(self, stats: dict) -> GenerateResult:
        return GenerateResult(
            token_ids=self.ids, logprobs=self.logprobs, finish_reasons=list(self.reasons),
            text=None if self.texts is None else [self.text(r) for r in range(len(self.ids))],
            stats=stats)


def _run(model, params, prompts, config: DecodeConfig, *, tokenizer, seeds, proxy, chunk_steps,
         mesh, rules) -> Iterator[StreamChunk]:
    """Prefill, then decode in chunks of ``chunk_steps`` (None: one chunk to the end).

    Yields a StreamChunk after prefill and after each chunk while rows are
    running (only when ``chunk_steps`` is set), then a final one with the result.
    """
    models, all_params = [model], [params]
    if proxy is not None:
        models += [proxy.expert, proxy.anti]
        all_params += [proxy.expert_params, proxy.anti_params]
    ids = _prompt_ids(prompts, tokenizer, model.config.vocab_size)
    if config.stop and tokenizer is None:
        raise CadenzaError("stop strings need a tokenizer (they are matched on text)",
                           where="decode.stop", fix="pass tokenizer=..., or use stop_token_ids")
    padded_len, max_len = _check_models(models, config, max(len(p) for p in ids))
    b, n_new = len(ids), config.max_new_tokens
    seeds = [config.seed + i for i in range(b)] if seeds is None else [int(s) for s in seeds]
    if len(seeds) != b:
        raise CadenzaError(f"{len(seeds)} seeds for {b} prompts", where="generate(seeds=...)",
                           fix="give one seed per prompt")
    models, all_params = map(list, zip(*map(decode_layout, models, all_params)))
    program = _Program(model_configs=tuple(m.config for m in models),
                       spec=config.sampling_spec(), num_new=n_new, max_len=max_len,
                       rules=None if rules is None else tuple(rules))
    lengths = np.array([len(p) for p in ids], np.int32)
    tokens = np.zeros((b, padded_len), np.int32)
    for i, p in enumerate(ids):
        tokens[i, :len(p)] = p
    params_t, alpha = tuple(all_params), jnp.float32(config.proxy_alpha)
    stop_ids = _stop_ids(model, config, tokenizer)
    rows = _Rows(ids, stop_ids, config.stop, tokenizer)
    stop_arr = np.full(-(-max(len(stop_ids), 1) // _STOP_BUCKET) * _STOP_BUCKET, -1, np.int32)
    stop_arr[:len(stop_ids)] = stop_ids

    t_start = time.perf_counter()
    args = (params_t, alpha, jnp.asarray(tokens), jnp.asarray(lengths),
            jnp.asarray(seeds, jnp.int32), jnp.asarray(stop_arr))
    prefill, compile_s = _compiled(program, "prefill", mesh, args)
    t0 = time.perf_counter()
    state = jax.block_until_ready(prefill(*args))
    prefill_s = time.perf_counter() - t0
    decode_s, chunks, step = 0.0, 0, 1

    def sync(state, lo, hi):
        stopped = rows.pull(state, lo, hi)
        return state.replace(done=state.done | jnp.asarray(stopped)) if stopped.any() else state

    if chunk_steps:
        state = sync(state, 0, 1)
        if not rows.all_finished:
            yield rows.chunk(step)
    while step < n_new and not (chunk_steps and rows.all_finished):
        until = min(step + (chunk_steps or n_new), n_new)
        dargs = (params_t, alpha, state, jnp.int32(until))
        decode, c_s = _compiled(program, "decode", mesh, dargs, donate=(2,))
        compile_s += c_s
        t0 = time.perf_counter()
        state = jax.block_until_ready(decode(*dargs))
        decode_s += time.perf_counter() - t0
        chunks += 1
        lo, step = step, int(state.step)
        if not chunk_steps:
            break
        state = sync(state, lo, step)
        if step < n_new and not rows.all_finished:
            yield rows.chunk(step)
    if not chunk_steps:
        rows.pull(state, 0, step)

    decoded = int(np.asarray(state.num_generated).sum()) - b     # tokens made by decode steps
    stats = {
        "batch": b, "max_len": max_len, "prompt_tokens": int(lengths.sum()),
        "generated_tokens": sum(len(t) for t in rows.ids), "compile_s": compile_s,
        "prefill_s": prefill_s, "decode_s": decode_s, "steps": step - 1, "chunks": chunks,
        "decode_tokens_per_s": decoded / decode_s if decode_s > 0 else 0.0,
        "wall_s": time.perf_counter() - t_start,
    }
    final = rows.chunk(step)
    final.result = rows.result(stats)
    yield final
