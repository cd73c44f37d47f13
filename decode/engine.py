"""The serving engine: continuous batching over a fixed number of decode slots.

An :class:`Engine` owns one decoding method's state for ``slots`` rows (one
preallocated KV cache; each row keeps its own length) and a background
thread that, between decode steps:

1. takes submitted :class:`Request` s from a thread-safe inbox (validated on
   submission: :meth:`Engine.check` raises :class:`~cadenza.errors.CadenzaError`);
2. prefills each waiting request alone (its prompt right-padded to a multiple of
   16 tokens, so nearby lengths share one program) and writes the resulting row
   into a free slot (one jitted program per prompt bucket: prefill + insert);
3. runs ``steps_per_sync`` decode steps over all slots in one jitted program
   (the method's own ``step``: plain decoding or a speculative round, per-row
   acceptance); finished and free slots compute but emit nothing;
4. pulls the new tokens, matches stop strings on the host (as ``generate`` does),
   hands each request's delta to its :class:`Handle`, and frees finished slots.

What is data, per slot (no recompile): the prompt, sampler settings
(:class:`~cadenza.decode.sampling.RowSampling`: temperature 0 = greedy, top-k,
top-p, min-p), the seed, stop token ids (at most :data:`MAX_STOP_IDS`, EOS
included), the token limit and the adapter id (``row_params``: a hook that
puts the per-row adapter ids into the params, for multi-adapter forwards).

Guarantees: a greedy request's tokens equal :func:`cadenza.decode.generate` on
the same prompt alone, whatever else is in the batch, in float32 (rows never
mix: every op is per row; what differs is only the batch and cache shape, which
can change float reductions by an ulp, not the argmax except at exact ties). In
bfloat16 such an ulp can tip an activation to the neighbouring bfloat16 value, which
propagates, so a near-tie can flip and the output then diverges from ``generate``'s
(both valid greedy decodes); see docs/serving.md.
A sampled request draws with keys ``fold_in(seed, engine step)``: it follows
the requested distribution but its tokens depend on when it was scheduled.
"""

import dataclasses
import itertools
import math
import queue
import threading
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from cadenza.decode.config import DecodeConfig
from cadenza.decode.driver import (
    PROMPT_BUCKET,
    SLOT_BUCKET,
    GenerateResult,
    Rows,
    compiled,
    decode_loop,
    prompt_ids,
    stop_ids,
)
from cadenza.decode.forward import prefix_slots
from cadenza.decode.method import Batch
from cadenza.decode.sampling import RowSampling
from cadenza.errors import CadenzaError

MAX_STOP_IDS = 16                  # stop token ids per request (EOS included)
SERVABLE = ("greedy", "sample", "speculative", "ngram", "medusa")


@dataclasses.dataclass(frozen=True)
class Request:
    """One completion request: ``prompt`` text (needs a tokenizer; encoded with BOS) or
    token ids; ``max_tokens`` >= 1; ``temperature`` 0 = greedy; ``top_k`` 0 = off;
    ``top_p`` in (0, 1]; ``min_p`` in [0, 1); ``seed`` (default: the request's number);
    ``stop`` strings; ``stop_token_ids`` (plus EOS unless ``ignore_eos``); ``adapter``:
    a name the engine knows, or None for the base model."""

    prompt: str | tuple
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple = ()
    stop_token_ids: tuple = ()
    ignore_eos: bool = False
    adapter: str | None = None


@dataclasses.dataclass
class Delta:
    """What a request produced since its previous delta: new ``token_ids``, their
    ``logprobs``, new final ``text`` (None without a tokenizer; text that may begin a stop
    string is held back), ``finished``; the last delta carries ``finish_reason``
    (``stop_token``, ``stop_string``, ``length``, ``error`` or ``cancelled``) and
    ``result`` (a one-row :class:`~cadenza.decode.driver.GenerateResult`)."""

    token_ids: list
    logprobs: list
    text: str | None
    finished: bool = False
    finish_reason: str | None = None
    result: GenerateResult | None = None


class Handle:
    """A submitted request: its deltas arrive on ``events`` (a queue) or, when given at
    submission, through ``on_delta`` (called on the engine thread; must not block)."""

    def __init__(self, engine, request, number: int, ids, stops, rows, on_delta=None):
        self.engine, self.request, self.number = engine, request, number
        self.ids, self.stops = ids, stops
        self.rows = rows
        self.events: queue.Queue = queue.Queue()
        self.on_delta = on_delta or self.events.put
        self.slot: int | None = None
        self.pulled = 0
        self.submitted = time.perf_counter()
        self.first_token_s: float | None = None
        self.finished = False

    def cancel(self) -> None:
        """Stop the request (its slot is freed); its last delta says ``cancelled``."""
        self.engine.cancel(self)

    def __iter__(self):
        """The deltas as they come, up to the finished one (only without ``on_delta``)."""
        while True:
            delta = self.events.get()
            yield delta
            if delta.finished:
                return

    def result(self, timeout: float | None = None) -> GenerateResult:
        """Wait for the end; the request's GenerateResult (raises queue.Empty on timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            delta = self.events.get(timeout=left)
            if delta.finished:
                return delta.result


def batch_axes(prefill, params, make_batch):
    """For each leaf of the state ``prefill(params, batch)`` returns: the axis that indexes
    rows, or -1 for leaves shared by all rows (found by tracing prefills of 1 and 2 rows
    of ``make_batch(rows)``; nothing runs)."""
    one = jax.eval_shape(prefill, params, make_batch(1))
    two = jax.eval_shape(prefill, params, make_batch(2))

    def axis(a, b):
        diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        return diff[0] if diff else -1

    return jax.tree.map(axis, one, two)


def put_rows(state, rows_state, axes, at):
    """``state`` with ``rows_state``'s rows written at row ``at`` (int32 scalar) along
    each leaf's batch axis (``axes`` from :func:`batch_axes`; shared leaves keep
    ``state``'s value)."""
    return jax.tree.map(
        lambda big, small, ax: big if ax < 0 else jax.lax.dynamic_update_slice_in_dim(
            big, small, at, ax),
        state, rows_state, axes)


def plain_adapter_rows(params, ids):
    """Params of a plain method, ``((forward params, *partners), alpha)``, with the base
    forward's ``adapter_ids`` set to ``ids`` int32 [B] (a multi-adapter forward)."""
    (base, *partners), alpha = params
    return ({**base, "adapter_ids": ids}, *partners), alpha


def speculative_adapter_rows(params, ids):
    """Params of a speculative method, ``(target params, draft params)``, with the
    target's ``adapter_ids`` set to ``ids`` int32 [B]."""
    target, draft = params
    return {**target, "adapter_ids": ids}, draft


class Engine:
    """Continuous batching for a plain or speculative method (see the module docstring).

    Args:
      method, params: a built method (:func:`cadenza.decode.registry.build`) and its
        params; :meth:`build` makes both from a model and a DecodeConfig.
      slots: decode rows; max_len: prompt + generated tokens per request (the cache
        holds this plus the method's draft slots).
      tokenizer: for text prompts, text output and stop strings (optional).
      adapters: ``{name: id}`` of adapters the params hold; ``base_id``: the id of rows
        without one (default -1); row_params: ``(params, ids int32 [B]) -> params`` giving
        the forward each row's adapter id (required with adapters; a module-level
        function, so that engines share compiled programs).
      steps_per_sync: decode steps per device program between host syncs.
    """

    def __init__(self, method, params, *, slots: int = 4, max_len: int = 256,
                 tokenizer=None, adapters: dict | None = None, row_params=None,
                 base_id: int = -1, steps_per_sync: int = 1, mesh=None):
        if method.name not in SERVABLE and getattr(method, "drafter", None) is None:
            raise CadenzaError(f"method {method.name!r} cannot be served",
                               where="decode.method", fix=f"use one of: {', '.join(SERVABLE)}")
        if slots < 1 or steps_per_sync < 1:
            raise CadenzaError(f"slots={slots} and steps_per_sync={steps_per_sync} must be >= 1",
                               where="Engine(slots=...) / --slots", fix="use at least one slot")
        if adapters and row_params is None:
            raise CadenzaError("adapters need a multi-adapter forward (row_params)",
                               where="Engine(adapters=...) / --adapter",
                               fix="load adapters with their forward")
        self.method, self.params, self.tokenizer, self.mesh = method, params, tokenizer, mesh
        self.config = method.forward.config
        self.slots, self.max_len, self.steps_per_sync = slots, max_len, steps_per_sync
        self.adapters = dict(adapters or {})
        self.row_params = row_params
        prefix = prefix_slots(method.forward)
        mpe = min(c.max_position_embeddings for c in method.model_configs()) - prefix
        if not 1 <= max_len <= mpe:
            raise CadenzaError(f"max_len={max_len} must be in [1, {mpe}] (the model's "
                               "positions)", where="Engine(max_len=...) / --max-len",
                               fix=f"use --max-len <= {mpe}")
        cache = prefix + max_len
        if method.slots:
            cache = -(-(cache + method.slots) // SLOT_BUCKET) * SLOT_BUCKET
        self.cache_len = cache
        self.base_id = base_id
        self.axes = batch_axes(self._prefill_fn, params, self._empty)
        init, _ = compiled(self._init_fn, (method, "engine-init", row_params, base_id), mesh,
                           (params, self._empty(slots)))
        self.state = init(params, self._empty(slots))
        self.adapter_ids = jnp.full((slots,), base_id, jnp.int32)
        self._step = int(self.state.out.step)
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: list[Handle] = []
        self._active: list[Handle | None] = [None] * slots
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._cancel_on_close = True
        self.failure: str | None = None
        self.counts = dict(submitted=0, finished=0, cancelled=0, generated_tokens=0,
                           decode_steps=0, slot_steps=0, decode_tokens=0, busy_s=0.0)
        self.started = time.perf_counter()

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def build(cls, model, params, config: DecodeConfig | None = None, *, rules=None,
              tokenizer=None, **kwargs) -> "Engine":
        """An engine for ``config.method`` (greedy, sample, speculative, ngram or medusa) on
        ``model`` (as :func:`cadenza.decode.generate` takes it); ``kwargs``: the method's
        resources (``drafter``, ``draft_params``) and :class:`Engine`'s keyword args.
        With ``adapters`` (a multi-adapter forward's ``{name: index}``) and no
        ``row_params``, each slot's adapter index goes into the forward's
        ``adapter_ids`` (:func:`plain_adapter_rows`, :func:`speculative_adapter_rows`)."""
        from cadenza.decode.registry import build

        config = config or DecodeConfig()
        names = ("drafter", "draft_params", "proxy")
        resources = {k: kwargs.pop(k) for k in names if k in kwargs}
        if config.method not in SERVABLE:
            raise CadenzaError(f"method {config.method!r} cannot be served",
                               where="decode.method", fix=f"use one of: {', '.join(SERVABLE)}")
        method, mparams = build(model, params, config, rules=rules, tokenizer=tokenizer,
                                **resources)
        if kwargs.get("adapters") and kwargs.get("row_params") is None:
            kwargs["row_params"] = (speculative_adapter_rows if hasattr(method, "drafter")
                                    else plain_adapter_rows)
        return cls(method, mparams, tokenizer=tokenizer, **kwargs)

    def _batch(self, ids, seeds, stops, requests) -> Batch:
        """A right-padded Batch of ``ids`` with per-row data (sampler, limits, stops)."""
        longest = max(len(p) for p in ids)
        t = max(min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, self.max_len), longest)
        tokens = np.zeros((len(ids), t), np.int32)
        stop_arr = np.full((len(ids), MAX_STOP_IDS), -1, np.int32)
        for i, (p, s) in enumerate(zip(ids, stops)):
            tokens[i, :len(p)] = p
            stop_arr[i, :len(s)] = s
        rows = RowSampling.of(*zip(*[(r.temperature, r.top_k, r.top_p, r.min_p)
                                     for r in requests]))
        return Batch(tokens=jnp.asarray(tokens), lengths=jnp.asarray([len(p) for p in ids],
                                                                     jnp.int32),
                     seeds=jnp.asarray(seeds, jnp.int32), stop_ids=jnp.asarray(stop_arr),
                     num_new=self.max_len, max_len=self.cache_len, rows=rows,
                     limits=jnp.asarray([r.max_tokens for r in requests], jnp.int32))

    def _empty(self, rows: int) -> Batch:
        """A batch of ``rows`` one-token prompts (shapes for tracing, free slots)."""
        return self._batch([[0]] * rows, [0] * rows, [()] * rows, [Request((0,))] * rows)

    def _params(self, params, ids):
        return params if self.row_params is None else self.row_params(params, ids)

    def _prefill_fn(self, params, batch):
        ids = jnp.full_like(batch.lengths, self.base_id)
        return self.method.prefill(self._params(params, ids), batch)

    def _init_fn(self, params, batch):
        state = self._prefill_fn(params, batch)
        return state.replace(out=state.out.replace(done=jnp.ones_like(state.out.done)))

    def _insert_fn(self, params, state, adapter_ids, batch, slot, adapter):
        small = self.method.prefill(self._params(params, adapter[None]), batch)
        return (put_rows(state, small, self.axes, slot),
                jax.lax.dynamic_update_slice(adapter_ids, adapter[None], (slot,)))

    def _step_fn(self, params, state, adapter_ids, until):
        return decode_loop(self.method, self._params(params, adapter_ids), state, until)

    @staticmethod
    def _finish_fn(state, mask):
        return state.replace(out=state.out.replace(done=state.out.done | mask))

    # --- submission (any thread) ----------------------------------------------------------

    def check(self, request: Request):
        """Validate ``request`` (nothing compiles): returns ``(prompt ids, stop ids)``;
        raises CadenzaError naming the bad field."""
        vocab = self.config.vocab_size
        prompt = request.prompt if isinstance(request.prompt, str) else list(request.prompt)
        ids = prompt_ids([prompt], self.tokenizer, vocab)[0]
        checks = [
            (isinstance(request.max_tokens, int) and request.max_tokens >= 1, "max_tokens",
             f"max_tokens must be an integer >= 1, got {request.max_tokens!r}", "e.g. 16"),
            (len(ids) + request.max_tokens <= self.max_len, "max_tokens",
             f"the prompt ({len(ids)} tokens) plus max_tokens ({request.max_tokens}) exceeds "
             f"the context of {self.max_len} tokens", "shorten the prompt or lower max_tokens"),
            (math.isfinite(request.temperature) and request.temperature >= 0, "temperature",
             f"temperature must be a finite number >= 0, got {request.temperature}",
             "use 0 for greedy"),
            (request.seed is None or -2**31 <= request.seed < 2**31, "seed",
             f"seed must be a 32-bit integer, got {request.seed}", "use a smaller seed"),
            (0 <= request.top_k <= vocab, "top_k",
             f"top_k must be in [0, {vocab}], got {request.top_k}", "use 0 to turn it off"),
            (0 < request.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {request.top_p}",
             "use 1 to turn it off"),
            (0 <= request.min_p < 1, "min_p", f"min_p must be in [0, 1), got {request.min_p}",
             "use 0 to turn it off"),
            (not request.stop or self.tokenizer is not None, "stop",
             "stop strings need a tokenizer (the model has none)", "use stop_token_ids"),
            (request.adapter is None or request.adapter in self.adapters, "adapter",
             f"unknown adapter {request.adapter!r}",
             f"use one of: {', '.join(sorted(self.adapters)) or 'none (the base model)'}"),
        ]
        for ok, field, what, fix in checks:
            if not ok:
                raise CadenzaError(what, where=f"request.{field}", fix=fix)
        stops = stop_ids(self.config, DecodeConfig(stop_token_ids=tuple(request.stop_token_ids),
                                                   ignore_eos=request.ignore_eos),
                         self.tokenizer)
        if len(stops) > MAX_STOP_IDS:
            raise CadenzaError(f"{len(stops)} stop token ids (EOS included); at most "
                               f"{MAX_STOP_IDS}", where="request.stop_token_ids",
                               fix="give fewer stop token ids")
        return ids, stops

    def submit(self, request: Request, on_delta=None) -> Handle:
        """Validate and queue ``request``; returns its Handle (thread-safe). Raises
        CadenzaError on a bad request and RuntimeError once the engine is closing."""
        if self._closing.is_set() or self.failure:
            raise RuntimeError(self.failure or "the engine is shutting down")
        ids, stops = self.check(request)
        rows = Rows([ids], stops, list(request.stop), self.tokenizer)
        with self._lock:       # the loop drains the inbox under it once it stops
            if self._stopped:
                raise RuntimeError(self.failure or "the engine is shutting down")
            number = next(self._numbers)
            self.counts["submitted"] += 1
            handle = Handle(self, request, number, ids, stops, rows, on_delta)
            self._inbox.put(("submit", handle))
        return handle

    def cancel(self, handle: Handle) -> None:
        """Cancel ``handle`` (thread-safe; nothing happens if it already finished)."""
        self._inbox.put(("cancel", handle))

    # --- the loop (engine thread) ---------------------------------------------------------

    def start(self) -> "Engine":
        """Run the loop in a background daemon thread; returns self."""
        self._thread = threading.Thread(target=self._run, name="cadenza-engine", daemon=True)
        self._thread.start()
        return self

    def close(self, cancel: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting requests; cancel in-flight ones (``cancel``) or let them finish;
        wait up to ``timeout`` s for the loop thread."""
        self._cancel_on_close = cancel
        self._closing.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while True:
                busy = any(h is not None for h in self._active) or self._waiting
                self._take(block=not busy)
                if self._closing.is_set():
                    if self._cancel_on_close:
                        for h in self._waiting + [h for h in self._active if h is not None]:
                            self._drop(h)
                    if not self._waiting and all(h is None for h in self._active):
                        self._cancel_late()
                        return
                self._fill()
                if any(h is not None for h in self._active):
                    self._decode()
        except Exception as e:   # a bug: fail every request rather than hang them
            self.failure = f"engine loop failed: {type(e).__name__}: {e}"
            for h in self._waiting + [h for h in self._active if h is not None]:
                self._end(h, "error")
            self._cancel_late()
            raise

    def _cancel_late(self) -> None:
        """Refuse new requests; end those submitted while the loop was stopping."""
        with self._lock:
            self._stopped = True
        while True:
            try:
                kind, h = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit" and not h.finished:
                self.counts["cancelled"] += 1
                self._end(h, "cancelled")

    def _take(self, block: bool) -> None:
        """Move inbox messages into the waiting list (cancellations act at once)."""
        try:
            msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, h = msg
            if kind == "submit":
                self._waiting.append(h)
            elif kind == "cancel" and not h.finished:
                self._drop(h)
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drop(self, h: Handle) -> None:
        if h.slot is not None:
            mask = np.zeros(self.slots, bool)
            mask[h.slot] = True
            self._finish_slots(mask)
            self._active[h.slot] = None
        elif h in self._waiting:
            self._waiting.remove(h)
        self.counts["cancelled"] += 1
        self._end(h, "cancelled")

    def _finish_slots(self, mask) -> None:
        fn, _ = compiled(self._finish_fn, ("engine-finish",), self.mesh,
                         (self.state, jnp.asarray(mask)), donate=(0,))
        self.state = fn(self.state, jnp.asarray(mask))

    def _fill(self) -> None:
        """Prefill waiting requests into free slots, oldest first."""
        for slot in range(self.slots):
            if not self._waiting:
                return
            if self._active[slot] is not None:
                continue
            h = self._waiting.pop(0)
            r = h.request
            seed = h.number if r.seed is None else r.seed
            batch = self._batch([h.ids], [seed], [h.stops], [r])
            adapter = jnp.int32(self.adapters.get(r.adapter, self.base_id))
            args = (self.params, self.state, self.adapter_ids, batch, jnp.int32(slot), adapter)
            fn, _ = compiled(self._insert_fn, (self.method, "engine-insert", self.row_params),
                             self.mesh, args, donate=(1, 2))
            t0 = time.perf_counter()
            self.state, self.adapter_ids = fn(*args)
            self.counts["busy_s"] += time.perf_counter() - t0
            h.slot, self._active[slot] = slot, h

    def _decode(self) -> None:
        """One device program of decode steps, then every active row's delta."""
        step0 = self._step
        until = jnp.int32(step0 + self.steps_per_sync)
        args = (self.params, self.state, self.adapter_ids, until)
        fn, _ = compiled(self._step_fn, (self.method, "engine-step", self.row_params),
                         self.mesh, args, donate=(1,))
        t0 = time.perf_counter()
        self.state = fn(*args)
        out = jax.device_get(self.state.out)
        self.counts["busy_s"] += time.perf_counter() - t0
        self._step = int(out.step)
        steps = self._step - step0
        active = [h for h in self._active if h is not None]
        self.counts["decode_steps"] += steps
        self.counts["slot_steps"] += steps * len(active)
        stop = np.zeros(self.slots, bool)
        for h in active:
            s = h.slot
            view = SimpleNamespace(tokens=out.tokens[s:s + 1], logprobs=out.logprobs[s:s + 1],
                                   num_generated=out.num_generated[s:s + 1],
                                   done=out.done[s:s + 1], error=out.error[s:s + 1])
            num = int(out.num_generated[s])
            self.counts["decode_tokens"] += max(num - max(h.pulled, 1), 0)
            stop[s] = bool(h.rows.pull(view, h.pulled, num)[0])
            h.pulled = num
            reason = h.rows.reasons[0]
            if reason is None:
                self._emit(h)
            else:
                self._active[s] = None
                self.counts["finished"] += 1
                self._end(h, reason)
        if stop.any():
            self._finish_slots(stop)

    def _emit(self, h: Handle, reason: str | None = None) -> None:
        sent = h.rows.sent_tokens[0]
        chunk = h.rows.chunk(0)
        ids = chunk.token_ids[0]
        if ids and h.first_token_s is None:
            h.first_token_s = time.perf_counter() - h.submitted
        self.counts["generated_tokens"] += len(ids)
        delta = Delta(token_ids=ids, logprobs=h.rows.logprobs[0][sent:sent + len(ids)],
                      text=None if chunk.text is None else chunk.text[0])
        if reason is not None:
            h.finished = True
            stats = {"method": self.method_name, "prompt_tokens": len(h.ids),
                     "generated_tokens": len(h.rows.ids[0]),
                     "ttft_s": h.first_token_s, "wall_s": time.perf_counter() - h.submitted}
            res = h.rows.result(stats, {})
            res.finish_reasons = [reason]
            delta.finished, delta.finish_reason, delta.result = True, reason, res
        if ids or delta.text or delta.finished:
            h.on_delta(delta)

    def _end(self, h: Handle, reason: str) -> None:
        h.slot = None
        self._emit(h, reason)

    # --- observation ----------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` was called (no new requests are taken)."""
        return self._closing.is_set()

    @property
    def method_name(self) -> str:
        """The method's name (a speculative method's: its drafter's, e.g. ``ngram``)."""
        drafter = getattr(self.method, "drafter", None)
        return drafter.name if drafter is not None else self.method.name

    def metrics(self) -> dict:
        """Queue depth, slot use, token counts, tokens/s (over busy device time) and the
        mean tokens a running slot gains per decode step (1 for plain decoding; the
        speculative acceptance, bonus token included, otherwise)."""
        c = dict(self.counts)
        busy = sum(h is not None for h in self._active)
        return {**c, "queue_depth": len(self._waiting) + self._inbox.qsize(),
                "slots": self.slots, "slots_busy": busy, "method": self.method_name,
                "tokens_per_s": c["generated_tokens"] / c["busy_s"] if c["busy_s"] else 0.0,
                "tokens_per_slot_step": (c["decode_tokens"] / c["slot_steps"]
                                         if c["slot_steps"] else 0.0),
                "uptime_s": time.perf_counter() - self.started, "failure": self.failure}
