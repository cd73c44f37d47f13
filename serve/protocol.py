"""The OpenAI-compatible request bodies: parsing into engine requests, response shapes.

:func:`completion_request` and :func:`chat_request` read a decoded JSON body
and return engine :class:`~cadenza.decode.engine.Request` s, raising
:class:`ApiError` (HTTP 400, OpenAI's error body) for anything they cannot
honour: unknown fields, wrong types, out-of-range sampler values, an unknown
model. Fields OpenAI defines that cadenza does not implement are accepted only
at their neutral value (``n`` 1, penalties 0, ``echo`` false, no
``logit_bias``), so nothing a client asks for is silently dropped.

Extensions (as in vLLM): ``top_k``, ``min_p``, ``stop_token_ids``,
``ignore_eos``; responses carry each choice's ``token_ids``.
"""

import dataclasses
import time

from cadenza.decode.engine import Request

FINISH = {"stop_token": "stop", "stop_string": "stop", "length": "length", "error": "error",
          "cancelled": "cancelled"}

_SAMPLING = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
             "stop_token_ids", "ignore_eos"}
_COMMON = {"model", "stream", "stream_options", "user"} | _SAMPLING
# OpenAI fields accepted at their neutral value only: name -> allowed values
_NEUTRAL = {"n": (1, None), "frequency_penalty": (0, 0.0, None),
            "presence_penalty": (0, 0.0, None), "logit_bias": (None, {}),
            "best_of": (1, None), "echo": (False, None), "suffix": (None,)}


class ApiError(Exception):
    """A request the server refuses: ``status`` (400), OpenAI's ``type``, ``param``, ``code``."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int = 400, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = (
            message, param, code, status, type)

    def body(self) -> dict:
        """OpenAI's error body: ``{"error": {message, type, param, code}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _number(body, name, default, kind=float):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise ApiError(f"{name} must be a{'n integer' if kind is int else ' number'}, got "
                       f"{value!r}", param=name)
    return kind(value)


def _strings(body, name) -> tuple:
    value = body.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) and s for s in value):
        return tuple(value)
    raise ApiError(f"{name} must be a string or a list of non-empty strings", param=name)


def _check_fields(body, allowed) -> None:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    for name in body:
        if name in _NEUTRAL:
            if body[name] not in _NEUTRAL[name]:
                raise ApiError(f"{name}={body[name]!r} is not supported by this server",
                               param=name, code="unsupported_parameter")
        elif name not in allowed:
            raise ApiError(f"unknown field {name!r}", param=name, code="unknown_parameter")


def _sampling(body, *, prompt, adapter) -> Request:
    ids = body.get("stop_token_ids") or []
    if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ApiError("stop_token_ids must be a list of token ids", param="stop_token_ids")
    ignore = body.get("ignore_eos", False)
    if not isinstance(ignore, bool):
        raise ApiError("ignore_eos must be true or false", param="ignore_eos")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                             or not -2**31 <= seed < 2**31):
        raise ApiError("seed must be a 32-bit integer", param="seed")
    return Request(prompt=prompt, max_tokens=_number(body, "max_tokens", 16, int),
                   temperature=_number(body, "temperature", 1.0),
                   top_k=_number(body, "top_k", 0, int), top_p=_number(body, "top_p", 1.0),
                   min_p=_number(body, "min_p", 0.0), seed=seed, stop=_strings(body, "stop"),
                   stop_token_ids=tuple(ids), ignore_eos=ignore, adapter=adapter)


@dataclasses.dataclass(frozen=True)
class Options:
    """How to answer: ``stream`` (server-sent events), ``usage_chunk`` (a last chunk with
    ``usage``: ``stream_options.include_usage``), ``logprobs`` (return them)."""

    stream: bool
    usage_chunk: bool
    logprobs: bool


def _options(body, logprobs: bool) -> Options:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError("stream must be true or false", param="stream")
    opts = body.get("stream_options")
    if opts is not None and (not stream or not isinstance(opts, dict) or set(opts) - {
            "include_usage"} or not isinstance(opts.get("include_usage", False), bool)):
        raise ApiError("stream_options must be {\"include_usage\": true|false}, with stream "
                       "true", param="stream_options")
    return Options(stream, bool(opts and opts.get("include_usage")), logprobs)


def _adapter(body, model_name: str, adapters) -> str | None:
    """The adapter the ``model`` field names (None: the base model)."""
    model = body.get("model", model_name)
    if model == model_name:
        return None
    if isinstance(model, str) and model in adapters:
        return model
    raise ApiError(f"model {model!r} does not exist; served: "
                   f"{', '.join([model_name, *sorted(adapters)])}", param="model",
                   code="model_not_found")


def completion_request(body, model_name: str, adapters=()) -> tuple[list[Request], Options]:
    """``(requests, options)`` of a /v1/completions body (one request per prompt: a
    string, a list of token ids, or a list of either)."""
    _check_fields(body, _COMMON | {"prompt", "logprobs"})
    prompt = body.get("prompt")
    single = isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                          and all(isinstance(t, int) for t in prompt))
    prompts = [prompt] if single else prompt
    if not isinstance(prompts, list) or not prompts or not all(
            (isinstance(p, str) and p) or (isinstance(p, list) and p and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p)) for p in prompts):
        raise ApiError("prompt must be a non-empty string, a list of token ids, or a list of "
                       "those", param="prompt")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                 or not 0 <= logprobs <= 1):
        raise ApiError("logprobs must be 0 or 1 (the chosen token's log-probability; "
                       "alternatives are not returned)", param="logprobs")
    adapter = _adapter(body, model_name, adapters)
    reqs = [_sampling(body, prompt=p if isinstance(p, str) else tuple(p), adapter=adapter)
            for p in prompts]
    return reqs, _options(body, logprobs is not None)


def chat_request(body, model_name: str, template, adapters=()) -> tuple[Request, Options]:
    """``(request, options)`` of a /v1/chat/completions body; ``template``: the
    tokenizer's ChatTemplate (None: the model has none, a 400)."""
    _check_fields(body, _COMMON | {"messages", "logprobs", "top_logprobs",
                                   "max_completion_tokens"})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise ApiError("messages must be a non-empty list of {role, content} objects with "
                       "string content", param="messages")
    if template is None:
        raise ApiError("this model has no chat template; use /v1/completions",
                       param="messages")
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool) or body.get("top_logprobs") not in (None, 0):
        raise ApiError("logprobs must be true or false (top_logprobs are not returned)",
                       param="logprobs")
    if "max_completion_tokens" in body and "max_tokens" not in body:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    text = template.render(messages, add_generation_prompt=True)
    return (_sampling(body, prompt=text, adapter=_adapter(body, model_name, adapters)),
            _options(body, logprobs))


def usage(results) -> dict:
    """OpenAI's ``usage`` of finished GenerateResults."""
    p = sum(r.stats["prompt_tokens"] for r in results)
    c = sum(len(r.token_ids[0]) for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def completion_logprobs(tokens: list, logprobs: list, tokenizer) -> dict:
    """A completion choice's ``logprobs``: the chosen tokens and their log-probabilities."""
    names = [tokenizer.decode([t]) if tokenizer is not None else str(t) for t in tokens]
    return {"tokens": names, "token_logprobs": logprobs, "top_logprobs": None,
            "text_offset": None}


def chat_logprobs(tokens: list, logprobs: list, tokenizer) -> dict:
    """A chat choice's ``logprobs`` (``content``: token, logprob, no alternatives)."""
    names = [tokenizer.decode([t]) if tokenizer is not None else str(t) for t in tokens]
    return {"content": [{"token": n, "logprob": lp, "bytes": list(n.encode()),
                         "top_logprobs": []} for n, lp in zip(names, logprobs)]}


def envelope(kind: str, number: int, model: str, choices: list, **extra) -> dict:
    """A response or stream chunk: ``kind`` is OpenAI's object name."""
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{number}", "object": kind, "created": int(time.time()),
            "model": model, "choices": choices, **extra}
