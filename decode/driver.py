"""The host side every decoding method shares: one driver, one result type.

:func:`run` takes a method (:mod:`cadenza.decode.method`), its params and a
ragged batch of prompts and does, for every method alike:

1. validation before anything compiles (:func:`prepare`): prompts (text needs
   a tokenizer; ids inside the vocabulary; none empty), the cache and
   position limits, seeds (one per prompt, default ``config.seed + i``),
   stop ids (``decode.stop_token_ids`` plus EOS unless ``ignore_eos``) and
   stop strings (need a tokenizer);
2. bucketed right-padding: prompts are padded to a multiple of 16 tokens
   (within the limits) and stop ids to a multiple of 8, so that nearby prompt
   lengths share one compiled program;
3. compilation, cached per (method, shapes, mesh) (:func:`compiled`): one
   prefill program and one decode program, a ``lax.while_loop`` of the
   method's ``step`` with the state donated; under ``mesh`` both compile in
   ``jax.set_mesh(mesh)`` (the forward carries the logical-axis rules);
4. chunking: with stop strings or streaming the loop runs ``chunk_steps``
   steps at a time; after each chunk the host decodes the new tokens, marks
   rows that produced a stop string done and truncates them there;
5. the result: :class:`GenerateResult` (ids, text, logprobs, finish reasons,
   stats, plus the method's ``extras``).
"""

import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cadenza.decode.config import DecodeConfig
from cadenza.decode.forward import prefix_slots
from cadenza.decode.method import Batch
from cadenza.decode.text import RowText, StopMatch, stable_prefix_length
from cadenza.errors import CadenzaError

PROMPT_BUCKET = 16
STOP_BUCKET = 8
SLOT_BUCKET = 16


@dataclasses.dataclass
class GenerateResult:
    """What every decoding method returns, one entry per prompt.

    ``token_ids``: generated ids (prompt excluded), including a final stop
    token id, cut after the token completing a stop string.
    ``text``: the generated text (tokenizer given), stop token and stop string
    excluded. ``logprobs``: log-probability of each returned token under the
    distribution it was chosen from (after repetition penalty and warpers;
    the method's own score where it has no such distribution).
    ``finish_reasons``: ``"stop_token"``, ``"stop_string"``, ``"length"`` or
    ``"error"`` (the model produced NaN or infinite logits; the row stopped before
    that token, and ``stats["errors"]`` says which rows and where).
    ``stats``: ``method``, prompt/generated token counts, ``compile_s``,
    ``prefill_s``, ``decode_s``, ``decode_tokens_per_s``, ``steps`` (decode
    loop iterations), ``chunks`` (host syncs after prefill), ``batch``,
    ``max_len``, plus the method's own (e.g. speculative acceptance).
    ``extras``: method-specific outputs (e.g. Superposed Decoding's k drafts).
    """

    token_ids: list[list[int]]
    text: list[str] | None
    logprobs: list[list[float]]
    finish_reasons: list[str]
    stats: dict
    extras: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StreamChunk:
    """One host sync of a streamed run: what each row produced since the previous chunk.

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


# --- validation --------------------------------------------------------------------------------

def prompt_ids(prompts, tokenizer, vocab: int) -> list[list[int]]:
    """Token-id lists for ``prompts`` (strings are encoded with BOS); raises CadenzaError on a
    non-list, an empty batch or prompt, text without a tokenizer, or ids outside ``[0, vocab)``."""
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


def stop_ids(model_config, config: DecodeConfig, tokenizer) -> tuple[int, ...]:
    """``config.stop_token_ids`` plus EOS (the tokenizer's, else the model's) unless
    ``ignore_eos``; raises CadenzaError on ids outside the vocabulary."""
    ids = list(config.stop_token_ids)
    if not config.ignore_eos:
        eos = tokenizer.eos_id if tokenizer is not None else model_config.eos_token_id
        if eos is not None:
            ids.append(eos)
    vocab = model_config.vocab_size
    bad = [t for t in ids if t >= vocab]
    if bad:
        raise CadenzaError(f"stop token ids {bad} are outside the vocabulary [0, {vocab})",
                           where="decode.stop_token_ids", fix="use ids of this model's tokenizer")
    return tuple(dict.fromkeys(ids))


@dataclasses.dataclass
class Prepared:
    """A validated batch on the host: ``ids`` (the prompts), ``batch`` (device arrays),
    ``stop_ids`` (the stop token ids)."""

    ids: list[list[int]]
    batch: Batch
    stop_ids: tuple[int, ...]


def prepare(method, prompts, config: DecodeConfig, *, tokenizer=None, seeds=None) -> Prepared:
    """Validate and pad a batch for ``method`` (see the module docstring); nothing compiles.

    Cache slots per row: the forward's prefix slots, plus ``decode.max_len``
    (default: padded prompt + ``max_new_tokens``), plus the method's
    ``slots`` (rounded up to a multiple of 16 when there are any).
    """
    mc = method.forward.config
    ids = prompt_ids(prompts, tokenizer, mc.vocab_size)
    if config.stop and tokenizer is None:
        raise CadenzaError("stop strings need a tokenizer (they are matched on text)",
                           where="decode.stop", fix="pass tokenizer=..., or use stop_token_ids")
    longest, n_new = max(len(p) for p in ids), config.max_new_tokens
    need = longest + n_new
    if config.max_len and need > config.max_len:
        raise CadenzaError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens ({n_new}) needs "
            f"{need} cache slots but max_len is {config.max_len}",
            where="decode.max_len", fix="raise decode.max_len or shorten the prompt / output")
    prefix = prefix_slots(method.forward)
    mpe = min(m.max_position_embeddings for m in method.model_configs()) - prefix
    if need > mpe:
        raise CadenzaError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens ({n_new}) exceeds "
            f"max_position_embeddings={mpe + prefix}"
            + (f" less the adapter's {prefix} virtual tokens" if prefix else ""),
            where="decode.max_new_tokens", fix="shorten the prompt or lower max_new_tokens")
    limit = min(config.max_len or mpe, mpe)
    padded = max(min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, limit - n_new), longest)
    max_len = prefix + (config.max_len or padded + n_new)
    if method.slots:
        max_len = -(-(max_len + method.slots) // SLOT_BUCKET) * SLOT_BUCKET
    b = len(ids)
    seeds = [config.seed + i for i in range(b)] if seeds is None else [int(s) for s in seeds]
    if len(seeds) != b:
        raise CadenzaError(f"{len(seeds)} seeds for {b} prompts", where="generate(seeds=...)",
                           fix="give one seed per prompt")
    stops = stop_ids(mc, config, tokenizer)
    tokens = np.zeros((b, padded), np.int32)
    for i, p in enumerate(ids):
        tokens[i, :len(p)] = p
    stop_arr = np.full(-(-max(len(stops), 1) // STOP_BUCKET) * STOP_BUCKET, -1, np.int32)
    stop_arr[:len(stops)] = stops
    batch = Batch(tokens=jnp.asarray(tokens), lengths=jnp.asarray([len(p) for p in ids], jnp.int32),
                  seeds=jnp.asarray(seeds, jnp.int32), stop_ids=jnp.asarray(stop_arr),
                  num_new=n_new, max_len=max_len)
    return Prepared(ids=ids, batch=batch, stop_ids=stops)


# --- compilation ------------------------------------------------------------------------------

# Least recently used programs are dropped beyond this many (a program per method, prompt
# bucket and batch shape; interleaving several methods over many buckets must not thrash).
_COMPILED: dict = {}
_MAX_COMPILED = 256
COMPILES = {"count": 0}   # programs compiled so far in this process (tests count them)


def compiled(fn, key, mesh, args, donate=()):
    """AOT-compile ``fn`` for ``args``' shapes, cached under ``key`` (hashable) and the shapes
    (the :data:`_MAX_COMPILED` most recently used programs are kept).

    Returns ``(compiled function, seconds spent compiling)``.
    """
    leaves, treedef = jax.tree.flatten(args)
    sig = tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)
    full = (key, mesh, treedef, sig)
    if full in _COMPILED:
        _COMPILED[full] = _COMPILED.pop(full)   # now the most recently used
        return _COMPILED[full], 0.0
    t0 = time.perf_counter()
    jitted = jax.jit(fn, donate_argnums=donate)
    if mesh is not None:
        with jax.set_mesh(mesh):
            out = jitted.lower(*args).compile()
    else:
        out = jitted.lower(*args).compile()
    if len(_COMPILED) >= _MAX_COMPILED:
        _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[full] = out
    COMPILES["count"] += 1
    return out, time.perf_counter() - t0


def decode_loop(method, params, state, until):
    """``method.step`` in a ``lax.while_loop`` while ``out.step < until`` (int32 scalar) and
    some row is unfinished; returns the state."""
    return jax.lax.while_loop(
        lambda s: (s.out.step < until) & ~jnp.all(method.done(s)),
        lambda s: method.step(params, s), state)


# --- host view of the rows --------------------------------------------------------------------

class Rows:
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

    def pull(self, out, lo: int, hi: int) -> np.ndarray:
        """Fetch slots ``[lo, hi)`` of every row from ``out`` (an Emitted or Harvest);
        returns the mask of rows newly stopped by a stop string (the device does not know)."""
        tokens = np.asarray(out.tokens[:, lo:hi])
        logprobs = np.asarray(out.logprobs[:, lo:hi])
        num = np.asarray(out.num_generated)
        done = np.asarray(out.done) if hasattr(out, "done") else np.ones(len(self.ids), bool)
        error = np.zeros(len(self.ids), bool) if out.error is None else np.asarray(out.error)
        stopped = np.zeros(len(self.ids), bool)
        for r in range(len(self.ids)):
            if self.reasons[r] is not None:
                continue
            n = max(0, min(hi, int(num[r])) - lo)
            self.ids[r] += tokens[r, :n].tolist()
            self.logprobs[r] += logprobs[r, :n].tolist()
            if error[r]:
                self.reasons[r] = "error"
            elif done[r]:
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

    def result(self, stats: dict, extras: dict) -> GenerateResult:
        return GenerateResult(
            token_ids=self.ids, logprobs=self.logprobs, finish_reasons=list(self.reasons),
            text=None if self.texts is None else [self.text(r) for r in range(len(self.ids))],
            stats=stats, extras=extras)


# --- the driver -------------------------------------------------------------------------------

def run(method, params, prompts, config: DecodeConfig | None = None, *, tokenizer=None,
        seeds=None, mesh=None, stream: bool = False) -> Iterator[StreamChunk]:
    """Decode ``prompts`` with ``method`` (params: whatever the method's functions take).

    Yields a :class:`StreamChunk` after prefill and after each chunk of
    ``config.chunk_steps`` steps while rows run (only when streaming, or when
    the config has stop strings), then a final one carrying ``result``.
    Raises CadenzaError before compiling on invalid input (:func:`prepare`) and
    when streaming / stop strings are asked of a method that cannot stop
    mid-way (``method.streams`` false).
    """
    config = config or DecodeConfig()
    prep = prepare(method, prompts, config, tokenizer=tokenizer, seeds=seeds)
    chunked = stream or bool(config.stop)
    if chunked and not method.streams:
        raise CadenzaError(f"method {method.name!r} cannot stream or stop at stop strings",
                           where="decode.stop / --stream",
                           fix="drop the stop strings / --stream for this method")
    chunk_steps = config.chunk_steps if chunked else None
    b, n_new = len(prep.ids), config.max_new_tokens
    rows = Rows(prep.ids, prep.stop_ids, config.stop, tokenizer)

    t_start = time.perf_counter()
    args = (params, prep.batch)
    prefill, compile_s = compiled(method.prefill, (method, "prefill"), mesh, args)
    t0 = time.perf_counter()
    state = jax.block_until_ready(prefill(*args))
    prefill_s = time.perf_counter() - t0
    decode_s, chunks = 0.0, 0
    step = step0 = int(state.out.step)
    at_prefill = int(np.asarray(state.out.num_generated).sum())
    limit = step0 + n_new     # every step emits at least one token per running row

    def sync(state, lo, hi):
        stopped = rows.pull(state.out, lo, hi)
        if stopped.any():
            state = state.replace(out=state.out.replace(done=state.out.done | jnp.asarray(stopped)))
        return state

    if chunk_steps:
        state = sync(state, 0, int(np.asarray(state.out.num_generated).max()))
        if not rows.all_finished:
            yield rows.chunk(step)
    pulled = int(np.asarray(state.out.num_generated).max()) if chunk_steps else 0
    while not bool(np.asarray(method.done(state)).all()) and step < limit:
        until = min(step + chunk_steps, limit) if chunk_steps else limit
        dargs = (params, state, jnp.int32(until))
        loop, c_s = compiled(lambda p, s, u: decode_loop(method, p, s, u), (method, "decode"),
                             mesh, dargs, donate=(1,))
        compile_s += c_s
        t0 = time.perf_counter()
        state = jax.block_until_ready(loop(*dargs))
        decode_s += time.perf_counter() - t0
        chunks += 1
        step = int(state.out.step)
        if not chunk_steps:
            break
        hi = int(np.asarray(state.out.num_generated).max())
        state = sync(state, pulled, hi)
        pulled = hi
        if rows.all_finished:
            break
        yield rows.chunk(step)
    harvest = jax.device_get(method.harvest(state))
    if not chunk_steps:
        rows.pull(harvest, 0, harvest.tokens.shape[1])
    decoded = int(np.asarray(harvest.num_generated).sum()) - at_prefill   # made by decode steps
    stats = {
        "method": method.name, "batch": b, "max_len": prep.batch.max_len,
        "prompt_tokens": sum(len(p) for p in prep.ids),
        "generated_tokens": sum(len(t) for t in rows.ids), "compile_s": compile_s,
        "prefill_s": prefill_s, "decode_s": decode_s, "steps": step - step0, "chunks": chunks,
        "decode_tokens_per_s": decoded / decode_s if decode_s > 0 else 0.0,
        "wall_s": time.perf_counter() - t_start,
    }
    errors = [f"row {r}: the model produced NaN or infinite logits after {len(rows.ids[r])} "
              f"tokens; the row stopped there" for r in range(b) if rows.reasons[r] == "error"]
    if errors:
        stats["errors"] = errors
    extras = dict(harvest.extras)
    if hasattr(method, "host_stats"):
        stats.update(method.host_stats(params, harvest, decoded))
    if hasattr(method, "host_extras"):
        extras = method.host_extras(extras, tokenizer)
    final = rows.chunk(step)
    final.result = rows.result(stats, extras)
    yield final


def generate_with(method, params, prompts, config: DecodeConfig | None = None, *,
                  tokenizer=None, seeds=None, mesh=None) -> GenerateResult:
    """:func:`run` to the end: the :class:`GenerateResult` (chunked only for stop strings)."""
    result = None
    for chunk in run(method, params, prompts, config, tokenizer=tokenizer, seeds=seeds,
                     mesh=mesh):
        result = chunk.result
    return result
