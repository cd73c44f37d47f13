"""The method registry: each decoding method's builder, config section and CLI flags.

``REGISTRY[name]`` is a :class:`MethodEntry`. :func:`generate` / :func:`stream`
build the method ``config.method`` names and run it through the driver;
``cadenza generate --method`` offers the registry's names and refuses flags
that the chosen method does not declare; the quickstart and the benchmarks
list methods from it. A new method is one module plus one entry here.
"""

import dataclasses
from collections.abc import Callable, Iterator

from cadenza.decode.config import DecodeConfig
from cadenza.errors import CadenzaError
from cadenza.validation import require

# flags every method takes (cadenza generate)
SHARED_FLAGS = ("--max-new-tokens", "--seed", "--stop", "--stop-token-id", "--ignore-eos",
                "--max-len", "--json", "--chat", "--adapter", "--quantize", "--quantize-targets",
                "--kv-cache")
SAMPLING_FLAGS = ("--temperature", "--top-k", "--top-p", "--min-p")


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """One registered method.

    ``build(forward, params, config, **resources) -> (method, method params)``
    (resources: ``proxy``, ``drafter``/``draft_params``, ``table``, ``lud``; what
    is not given is loaded from the paths in the config section); ``section``:
    the ``decode`` section it reads (None: shared fields only); ``flags``: the
    CLI flags it takes besides :data:`SHARED_FLAGS`; ``summary``: one line.
    """

    name: str
    build: Callable
    section: str | None
    flags: tuple[str, ...]
    summary: str


def _build_plain(forward, params, config, *, proxy=None, **_):
    import jax.numpy as jnp

    from cadenza.decode.forward import as_forward
    from cadenza.decode.plain import Plain

    forwards, all_params = [forward], [params]
    if proxy is None and config.proxy.expert:
        from cadenza.decode.plain import ProxyTuning
        from cadenza.models import load_model

        (ecfg, ep), (acfg, ap) = load_model(config.proxy.expert), load_model(config.proxy.anti)
        proxy = ProxyTuning(ecfg.model, ep, acfg.model, ap)
    if proxy is not None:
        rules = getattr(forward, "rules", None)
        forwards += [as_forward(proxy.expert, rules), as_forward(proxy.anti, rules)]
        all_params += [proxy.expert_params, proxy.anti_params]
    method = Plain(forwards=tuple(forwards), spec=config.sampling_spec(), name=config.method)
    method.check()
    return method, (tuple(all_params), jnp.float32(config.proxy.alpha))


def _build_speculative(forward, params, config, *, drafter=None, draft_params=None,
                       tokenizer=None, **_):
    from cadenza.decode.speculative import speculative_method

    if drafter is None:
        drafter, draft_params = _load_drafter(forward, params, config, tokenizer)
    if getattr(forward, "rules", None) is None and hasattr(drafter, "decode_layout"):
        drafter, draft_params = drafter.decode_layout(draft_params)   # as build's target
    return speculative_method(forward, drafter, config, draft_params), (params, draft_params)


def _load_drafter(forward, params, config, tokenizer=None):
    s = config.speculative
    if config.method == "ngram":
        from cadenza.decode.prompt_lookup import PromptLookup

        return PromptLookup(gamma=s.gamma, max_ngram=s.ngram_max, min_ngram=s.ngram_min), None
    if config.method == "medusa":
        from cadenza.decode.medusa import load_medusa_heads

        return load_medusa_heads(_heads_dir(config), forward.config)
    if config.method == "recycling":
        from cadenza.decode.token_recycling import TokenRecycling

        r = config.recycling
        return TokenRecycling(k=r.k, nodes=r.nodes, depth=r.depth), None
    if config.method == "layer_skip":
        from cadenza.decode.layer_skip import layer_skip_drafter

        return layer_skip_drafter(forward, params, config)
    from cadenza.decode.specdec_head import StopRule, load_accept_head
    from cadenza.decode.speculative import DraftModel, check_draft_vocab
    from cadenza.models import load_model
    from cadenza.models.checkpoint import check_same_tokenizer, tokenizer_dir

    require(bool(s.draft), "decode.speculative.draft",
            "method speculative needs a draft model directory",
            "set decode.speculative.draft (--draft)")
    dcfg, dparams = load_model(s.draft)
    check_draft_vocab(forward.config, dcfg.model)
    check_same_tokenizer(getattr(tokenizer, "directory", None), tokenizer_dir(s.draft),
                         what="the draft model", where="decode.speculative.draft (--draft)",
                         fix="use a draft model trained with the target's tokenizer")
    head, blocks = None, 3
    if s.adaptive == "head":
        head, blocks = load_accept_head(s.accept_head, dcfg.model)
    if s.adaptive == "none":
        return DraftModel(dcfg.model, s.gamma), (dparams, None)
    rule = StopRule(s.adaptive, s.adaptive_threshold, s.adaptive_min, blocks=blocks)
    name = "specdec++" if s.adaptive == "head" else "adaptive-confidence"
    return DraftModel(dcfg.model, s.gamma, stop=rule, name=name), (dparams, head)


def _heads_dir(config) -> str:
    require(bool(config.medusa.heads), "decode.medusa.heads",
            f"method {config.method} needs a trained {config.method.capitalize()} head "
            "directory",
            "set decode.medusa.heads (--heads)")
    return config.medusa.heads


def _build_hydra(forward, params, config, *, drafter=None, draft_params=None, **_):
    """Hydra heads (``decode.medusa.heads`` or the given ``drafter``/``draft_params``: the
    heads alone, or :func:`~cadenza.decode.hydra.hydra_draft_params`) with the target's
    embedding table."""
    from cadenza.decode.hydra import hydra_draft_params, load_hydra_heads
    from cadenza.decode.speculative import speculative_method

    if drafter is None:
        drafter, draft_params = load_hydra_heads(_heads_dir(config), forward.config)
    if not isinstance(draft_params, tuple):
        draft_params = hydra_draft_params(draft_params, params)
    return speculative_method(forward, drafter, config, draft_params), (params, draft_params)


def _build_superposed(forward, params, config, *, table=None, tokenizer=None, **_):
    from cadenza.decode.superposed import superposed_method

    return superposed_method(forward, params, config, table, tokenizer)


def _build_lud(forward, params, config, *, lud=None, **_):
    import jax.numpy as jnp

    from cadenza.decode.lud import lud_method
    from cadenza.decode.lud_config import LudConfig

    lud = lud or LudConfig()
    return lud_method(forward, params, lud), (params, jnp.float32(lud.beta))


_SPEC = ("--sample", "--gamma") + SAMPLING_FLAGS + ("--repetition-penalty",)

REGISTRY: dict[str, MethodEntry] = {e.name: e for e in (
    MethodEntry("greedy", _build_plain, "proxy",
                ("--repetition-penalty", "--stream", "--chunk-steps", "--proxy-expert",
                 "--proxy-anti", "--proxy-alpha"),
                "the argmax at every step"),
    MethodEntry("sample", _build_plain, "sampling",
                SAMPLING_FLAGS + ("--repetition-penalty", "--stream", "--chunk-steps",
                                  "--proxy-expert", "--proxy-anti", "--proxy-alpha"),
                "sampling with temperature, top-k, top-p, min-p"),
    MethodEntry("speculative", _build_speculative, "speculative",
                _SPEC + ("--draft", "--adaptive", "--accept-head"),
                "a draft model proposes, the target verifies (lossless)"),
    MethodEntry("ngram", _build_speculative, "speculative", _SPEC,
                "prompt lookup: drafts copied from the row's context (lossless)"),
    MethodEntry("medusa", _build_speculative, "medusa", _SPEC[:1] + _SPEC[2:] + ("--heads",),
                "trained Medusa heads propose a token tree (lossless)"),
    MethodEntry("hydra", _build_hydra, "medusa", _SPEC[:1] + _SPEC[2:] + ("--heads",),
                "trained Hydra heads, each reading the tokens drafted before it, propose a "
                "token tree (lossless)"),
    MethodEntry("recycling", _build_speculative, "recycling",
                _SPEC[:1] + _SPEC[2:] + ("--successors", "--tree-nodes", "--tree-depth"),
                "Token Recycling: the target's past top-k successors propose a tree "
                "(lossless)"),
    MethodEntry("layer_skip", _build_speculative, "layer_skip",
                _SPEC + ("--skip-layers", "--stop-threshold", "--search-skip"),
                "the target with some layers skipped drafts for itself (lossless)"),
    MethodEntry("superposed", _build_superposed, "superposed",
                ("--k", "--ngram", "--candidates", "--alpha", "--temperature"),
                "k drafts from one stream, interpolated with an n-gram table"),
    MethodEntry("lud", _build_lud, None, ("--beta", "--lookahead"),
                "lexical units decoded in parallel (a LUD-fine-tuned model)"),
)}


def entry(name: str) -> MethodEntry:
    """The registered method ``name`` (CadenzaError naming the choices otherwise)."""
    if name not in REGISTRY:
        raise CadenzaError(f"unknown decoding method {name!r}", where="decode.method",
                           fix=f"use one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def build(model, params, config: DecodeConfig, *, rules=None, **resources):
    """``(method, method params)`` for ``config.method`` on ``model`` (a Transformer,
    PeftModel or forward; sharded models: logical ``rules``).

    Unsharded (``rules`` None), a scanned Transformer decodes through its unrolled layout
    on CPU (:func:`cadenza.models.decode_layout`: XLA's CPU backend would copy every
    layer's weight slice on every decode step)."""
    from cadenza.decode.forward import as_forward, with_kv_cache
    from cadenza.models import decode_layout

    if rules is None:
        model, params = decode_layout(model, params)
    forward = with_kv_cache(as_forward(model, rules), config.kv_cache)
    return entry(config.method).build(forward, params, config, **resources)


def _select_adapters(model, params, prompts, adapters):
    """``params`` with each prompt's adapter selected (``adapters`` given), else unchanged."""
    if adapters is None:
        return params
    from cadenza.decode.multi_lora import with_adapters

    batch = len(prompts) if isinstance(prompts, list | tuple) else None   # else: driver refuses
    return with_adapters(model, params, adapters, batch)


def generate(model, params, prompts, config: DecodeConfig | None = None, *, tokenizer=None,
             seeds=None, adapters=None, mesh=None, rules=None, **resources):
    """Decode continuations of a ragged batch of prompts with ``config.method``.

    Args:
      model: a :class:`~cadenza.models.Transformer`, a PeftModel (params =
        ``(trainable, frozen)``; every adapter method, prefix and prompt tuning
        included) or a forward (:mod:`cadenza.decode.forward`); params: its params
        (sharded params work with ``mesh`` and logical ``rules``).
      prompts: a list of strings (needs ``tokenizer``, encoded with BOS) or of
        token-id lists; lengths may differ.
      config: :class:`DecodeConfig` (method, its section, stops, max_new_tokens).
      tokenizer: ``encode(text, add_bos=)``/``decode(ids)``/``eos_id``; gives
        ``text`` and enables stop strings.
      seeds: one int per prompt (default ``config.seed + i``); a row's samples
        depend only on its seed, prompt and settings.
      adapters: with a multi-adapter model (``bank.forward`` of
        :func:`cadenza.decode.multi_lora.load_adapter_bank`), one adapter name per
        prompt (None: the base alone); sets ``params["adapter_ids"]`` without recompiling.
      resources: in-memory parts a method would otherwise load from its config
        section: ``proxy`` (:class:`~cadenza.decode.plain.ProxyTuning`),
        ``drafter`` and ``draft_params``, ``table`` (an n-gram table), ``lud``
        (a :class:`~cadenza.decode.lud_config.LudConfig`).

    Returns a :class:`~cadenza.decode.driver.GenerateResult`. Raises CadenzaError,
    before compiling, on invalid prompts, limits, settings or resources.
    """
    from cadenza.decode.driver import generate_with

    config = config or DecodeConfig()
    params = _select_adapters(model, params, prompts, adapters)
    method, mparams = build(model, params, config, rules=rules, tokenizer=tokenizer, **resources)
    return generate_with(method, mparams, prompts, config, tokenizer=tokenizer, seeds=seeds,
                         mesh=mesh)


def stream(model, params, prompts, config: DecodeConfig | None = None, *, tokenizer=None,
           seeds=None, adapters=None, chunk_steps: int | None = None, mesh=None, rules=None,
           **resources) -> Iterator:
    """As :func:`generate`, yielding a :class:`~cadenza.decode.driver.StreamChunk` after
    the prefill and every ``chunk_steps`` steps (default ``config.chunk_steps``); the
    last chunk carries the result. Tokens equal :func:`generate`'s."""
    from cadenza.decode.driver import run

    config = config or DecodeConfig()
    if chunk_steps is not None:
        config = dataclasses.replace(config, chunk_steps=chunk_steps)
    params = _select_adapters(model, params, prompts, adapters)
    method, mparams = build(model, params, config, rules=rules, tokenizer=tokenizer, **resources)
    yield from run(method, mparams, prompts, config, tokenizer=tokenizer, seeds=seeds,
                   mesh=mesh, stream=True)
