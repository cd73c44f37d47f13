"""Serving: an OpenAI-compatible HTTP server over the continuous-batching engine.

- :mod:`cadenza.decode.engine`: the engine (slots, insertion between decode steps,
  per-request sampler settings, speculative rounds), usable without HTTP;
- :mod:`cadenza.serve.protocol`: request bodies -> engine requests, OpenAI's shapes;
- :mod:`cadenza.serve.app`: the Starlette app (routes, streaming, disconnects);
- :mod:`cadenza.serve.cli`: ``cadenza serve``.
"""
