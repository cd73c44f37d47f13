"""The HTTP server: an OpenAI-compatible Starlette app over a running :class:`Engine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``
answers with server-sent events, ``data: {chunk}`` lines ending with
``data: [DONE]``), ``GET /v1/models``, ``GET /health`` (200 while the engine
runs, 503 once it failed or is stopping), ``GET /metrics`` (the engine's
counters as JSON: queue depth, slot use, tokens/s, speculative acceptance).

Handlers run on the event loop and never block it: they submit requests to the
engine (its own thread) and receive deltas through ``loop.call_soon_threadsafe``.
A bad request is refused with 400 and OpenAI's error body before it reaches the
engine, so it cannot disturb other requests. A client that disconnects has its
requests cancelled and their slots freed. On shutdown (the ASGI lifespan's end,
after uvicorn's graceful wait for open requests) the engine cancels what is
still running.
"""

import asyncio
import contextlib
import dataclasses
import json
import threading

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from cadenza.errors import CadenzaError
from cadenza.serve.protocol import (
    FINISH,
    ApiError,
    chat_logprobs,
    chat_request,
    completion_logprobs,
    completion_request,
    envelope,
    usage,
)

# where an engine error points -> the request field (OpenAI's ``param``)
_PARAMS = {"generate(prompts=...)": "prompt", "decode.stop_token_ids": "stop_token_ids",
           **{f"request.{f}": f for f in ("max_tokens", "temperature", "top_k", "top_p",
                                          "min_p", "stop", "adapter", "stop_token_ids")}}


class _Inbox:
    """Deltas from the engine thread into an asyncio queue as ``(index, delta)``."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def sink(self, index: int):
        def put(delta):
            with contextlib.suppress(RuntimeError):    # the loop is gone (shutdown)
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, delta))
        return put


async def _body(request: HttpRequest):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"the request body is not valid JSON: {e}") from None


def _submit(engine, requests, inbox: _Inbox) -> list:
    handles = []
    try:
        for i, r in enumerate(requests):
            handles.append(engine.submit(r, on_delta=inbox.sink(i)))
    except CadenzaError as e:
        for h in handles:
            h.cancel()
        raise ApiError(str(e), param=_PARAMS.get(e.where, e.where)) from None
    except RuntimeError as e:
        for h in handles:
            h.cancel()
        raise ApiError(str(e), status=503, type="server_error") from None
    return handles


async def _finish_all(request: HttpRequest, handles, inbox: _Inbox) -> list:
    """Wait for every handle's result; cancel them all if the client goes away."""
    results = [None] * len(handles)
    left = len(handles)
    while left:
        try:
            i, delta = await asyncio.wait_for(inbox.queue.get(), 1.0)
        except TimeoutError:
            if await request.is_disconnected():
                for h in handles:
                    h.cancel()
                raise
            continue
        if delta.finished:
            results[i] = delta.result
            left -= 1
    return results


def make_app(engine, model_name: str, *, template=None, chat_stop_ids=()) -> Starlette:
    """The Starlette app serving ``engine`` as ``model_name`` (its adapters by their names);
    ``template``: the tokenizer's ChatTemplate for /v1/chat/completions, or None;
    ``chat_stop_ids``: its end-of-turn token ids (chat requests stop there too)."""
    tok = engine.tokenizer

    def choice(chat: bool, i: int, ids, logprobs, text, reason, want_lp, delta=None):
        """A choice of a response (``delta`` None) or of a stream chunk."""
        fmt = chat_logprobs if chat else completion_logprobs
        out = {"index": i, "token_ids": ids,
               "logprobs": fmt(ids, logprobs, tok) if want_lp else None,
               "finish_reason": None if reason is None else FINISH[reason]}
        if not chat:
            out["text"] = text or ""
        elif delta is None:
            out["message"] = {"role": "assistant", "content": text or ""}
        else:
            out["delta"] = {**delta, "content": text or ""}
        return out

    async def respond(request: HttpRequest, reqs, opts, chat: bool):
        name = reqs[0].adapter or model_name
        kind = "chat.completion" if chat else "text_completion"
        want_lp = opts.logprobs
        inbox = _Inbox()
        handles = _submit(engine, reqs, inbox)
        number = handles[0].number
        if opts.stream:
            started = set()
            chunk_kind = kind + (".chunk" if chat else "")

            def chunk(i, d):
                role = {} if i in started else {"role": "assistant"}
                started.add(i)
                return envelope(chunk_kind, number, name, [choice(
                    chat, i, d.token_ids, d.logprobs, d.text, d.finish_reason, want_lp,
                    delta=role)])

            def last(results):
                return envelope(chunk_kind, number, name, [], usage=usage(results))
            return _sse(handles, inbox, chunk, last if opts.usage_chunk else None)
        results = await _finish_all(request, handles, inbox)
        return JSONResponse(envelope(kind, number, name, [
            choice(chat, i, r.token_ids[0], r.logprobs[0], r.text[0] if r.text else "",
                   r.finish_reasons[0], want_lp) for i, r in enumerate(results)],
            usage=usage(results)))

    async def completions(request: HttpRequest):
        reqs, opts = completion_request(await _body(request), model_name, engine.adapters)
        return await respond(request, reqs, opts, chat=False)

    async def chat(request: HttpRequest):
        req, opts = chat_request(await _body(request), model_name, template, engine.adapters)
        req = dataclasses.replace(req, stop_token_ids=tuple(dict.fromkeys(
            req.stop_token_ids + tuple(chat_stop_ids))))
        return await respond(request, [req], opts, chat=True)

    async def models(request: HttpRequest):
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "cadenza",
                 **({"parent": model_name} if m != model_name else {})}
                for m in [model_name, *sorted(engine.adapters)]]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: HttpRequest):
        m = engine.metrics()
        if m["failure"] or engine.closing:
            return JSONResponse({"status": "failed" if m["failure"] else "stopping",
                                 "detail": m["failure"]}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(request: HttpRequest):
        return JSONResponse(engine.metrics())

    async def api_error(request: HttpRequest, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.close, True)

    return Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={ApiError: api_error}, lifespan=lifespan)


def _sse(handles, inbox: _Inbox, chunk, last=None) -> StreamingResponse:
    """Server-sent events of every handle's deltas (``chunk(index, delta) -> dict``), then
    ``last(results)`` if given, then ``[DONE]``; the handles are cancelled if the client
    disconnects first."""
    async def events():
        results = [None] * len(handles)
        try:
            while not all(results):
                i, delta = await inbox.queue.get()
                if delta.finished:
                    results[i] = delta.result
                yield f"data: {json.dumps(chunk(i, delta))}\n\n"
            if last is not None:
                yield f"data: {json.dumps(last(results))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for h in handles:
                if not h.finished:
                    h.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


class BackgroundServer:
    """uvicorn serving ``app`` from a daemon thread (tests, benchmarks); a context
    manager whose ``url`` is ``http://host:port`` (port 0: a free one)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="cadenza-http",
                                       daemon=True)
        self.host = host

    def __enter__(self) -> "BackgroundServer":
        import time

        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
