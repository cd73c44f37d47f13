"""Config section ``decode``: the method, the settings every method shares, one section per method.

``decode.method`` names a method of the registry (:mod:`cadenza.decode.registry`):
greedy, sample, speculative, ngram, medusa, hydra, recycling, layer_skip, superposed
or lud. Shared fields (stops, lengths, seed) live at the top of ``decode``; each method's
own settings live in its section: ``decode.sampling`` (greedy and sample; also the
warpers of the speculative methods), ``decode.speculative`` (speculative, ngram;
``sample`` and ``gamma`` also for the others that draft), ``decode.medusa`` (medusa,
hydra), ``decode.recycling``, ``decode.layer_skip``, ``decode.superposed``, ``decode.proxy``
(proxy-tuning partners for greedy/sample). Lexical Unit Decoding reads the
top-level ``lud`` section (shared with its fine-tuning).

:class:`SamplingSpec` (the static part the jitted samplers read) lives here
too, so that validating a config never imports JAX.
"""

import dataclasses

from cadenza.errors import CadenzaError
from cadenza.validation import check_choice, check_range, require

ADAPTIVE = ("none", "confidence", "head")
# the methods that decode through the speculative round (``decode.speculative.sample``)
SPECULATIVE_METHODS = ("speculative", "ngram", "medusa", "hydra", "recycling", "layer_skip")


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """How logits become a token (see :mod:`cadenza.decode.sampling`). Defaults disable filters.

    ``greedy`` applies only the repetition penalty and takes the argmax;
    ``sample`` also applies temperature, top-k (0 = off), top-p (1 = off)
    and min-p (0 = off) and draws from the result.
    """

    method: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        s = "decode.sampling"
        check_choice("decode", "method", self.method, ("greedy", "sample"))
        check_range(s, "temperature", self.temperature, low=0.0, low_inclusive=False)
        check_range(s, "top_k", self.top_k, low=0)
        check_range(s, "top_p", self.top_p, low=0.0, high=1.0, low_inclusive=False)
        check_range(s, "min_p", self.min_p, low=0.0, high=1.0, high_inclusive=False)
        check_range(s, "repetition_penalty", self.repetition_penalty, low=0.0,
                    low_inclusive=False)

    @property
    def uses_history(self) -> bool:
        """Whether the processing needs the seen-token mask (repetition penalty is on)."""
        return self.repetition_penalty != 1.0


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """``decode.sampling``: the warpers (method ``sample``, and speculative ``sample: true``).

    Temperature, top-k (0 = off), top-p (1 = off), min-p (0 = off); the
    repetition penalty (1 = off) also applies to greedy decoding.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        self.spec("sample")

    def spec(self, method: str) -> SamplingSpec:
        """The static sampler settings for ``method`` ("greedy" or "sample")."""
        return SamplingSpec(method=method, temperature=self.temperature, top_k=self.top_k,
                            top_p=self.top_p, min_p=self.min_p,
                            repetition_penalty=self.repetition_penalty)


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """``decode.speculative``: methods ``speculative`` (draft model) and ``ngram`` (prompt lookup).

    Lossless: greedy output equals plain greedy; with ``sample`` the output
    follows the target's distribution under ``decode.sampling``. ``draft``: the
    draft model directory; ``gamma``: draft tokens per round (the maximum when
    adaptive); ``adaptive`` ``"confidence"`` (training-free) or ``"head"``
    (SpecDec++, head directory ``accept_head``) stops a draft once
    ``1 - prod(a) > adaptive_threshold`` after at least ``adaptive_min`` tokens;
    ``ngram_max`` .. ``ngram_min``: the n-gram lengths prompt lookup searches.
    ``sample`` also applies to ``medusa``.
    """

    sample: bool = False
    draft: str = ""
    gamma: int = 4
    adaptive: str = "none"
    adaptive_threshold: float = 0.3
    adaptive_min: int = 2
    accept_head: str = ""
    ngram_max: int = 3
    ngram_min: int = 1

    def __post_init__(self):
        s = "decode.speculative"
        check_choice(s, "adaptive", self.adaptive, ADAPTIVE)
        check_range(s, "gamma", self.gamma, low=1)
        check_range(s, "adaptive_threshold", self.adaptive_threshold, low=0.0, high=1.0,
                    low_inclusive=False, high_inclusive=False)
        check_range(s, "adaptive_min", self.adaptive_min, low=1)
        check_range(s, "ngram_min", self.ngram_min, low=1)
        check_range(s, "ngram_max", self.ngram_max, low=self.ngram_min)
        require(self.adaptive != "head" or bool(self.accept_head),
                "decode.speculative.accept_head",
                "adaptive=head needs a trained SpecDec++ head directory",
                "set decode.speculative.accept_head (--accept-head), or use adaptive=confidence")


@dataclasses.dataclass(frozen=True)
class MedusaConfig:
    """``decode.medusa``: ``heads``, a trained Medusa (method medusa) or Hydra (method hydra)
    head directory (it records the tree)."""

    heads: str = ""


@dataclasses.dataclass(frozen=True)
class RecyclingConfig:
    """``decode.recycling``: Token Recycling (:mod:`cadenza.decode.token_recycling`).

    ``k`` successors kept per token (the table is V x k int32 per row); the static
    draft tree holds the ``nodes`` most promising paths at most ``depth`` deep.
    """

    k: int = 8
    nodes: int = 4
    depth: int = 3

    def __post_init__(self):
        for name in ("k", "nodes", "depth"):
            check_range("decode.recycling", name, getattr(self, name), low=1)
        require(self.depth <= self.nodes, "decode.recycling.depth",
                f"a tree of {self.nodes} nodes cannot be {self.depth} deep",
                "raise decode.recycling.nodes or lower depth")


@dataclasses.dataclass(frozen=True)
class LayerSkipConfig:
    """``decode.layer_skip``: layer-skip self-speculation (:mod:`cadenza.decode.layer_skip`).

    ``skip_layers``: indices of the target's layers the draft skips (at least one layer
    must stay); ``threshold``: a row stops drafting once ``1 - prod(q(d_i)) > threshold``
    after ``min_length`` drafts (the draft's own confidence; 1 = always draft
    ``decode.speculative.gamma`` tokens, which is the maximum).
    """

    skip_layers: list[int] = dataclasses.field(default_factory=list)
    threshold: float = 0.5
    min_length: int = 1

    def __post_init__(self):
        s = "decode.layer_skip"
        object.__setattr__(self, "skip_layers", tuple(int(i) for i in self.skip_layers))
        for i, layer in enumerate(self.skip_layers):
            check_range(s, f"skip_layers[{i}]", layer, low=0)
        require(len(set(self.skip_layers)) == len(self.skip_layers), f"{s}.skip_layers",
                f"layer indices repeat in {list(self.skip_layers)}", "give each layer once")
        check_range(s, "threshold", self.threshold, low=0.0, high=1.0, low_inclusive=False)
        check_range(s, "min_length", self.min_length, low=1)


@dataclasses.dataclass(frozen=True)
class SuperposedConfig:
    """``decode.superposed``: Superposed Decoding; defaults are the paper's (k = 3, C = 9, ...).

    ``num_drafts`` k drafts per prompt from the top ``num_candidates`` C tokens;
    ``temperature`` of the model's softmax; ``alpha`` the n-gram interpolation
    weight (0 = n-gram off); ``ngram_weights`` lambda for context lengths 1..J
    (bigram..(J+1)-gram), unnormalised; ``penalty`` for drafts with no n-gram
    support; ``table`` an n-gram table directory (``cadenza ngram build``).
    The paper's variants: C = 15 with alpha 0.48; up to 4-grams with weights
    (0.01, 0.04, 0.15), alpha 0.55, temperature 0.1.
    """

    num_drafts: int = 3
    num_candidates: int = 9
    temperature: float = 0.06
    alpha: float = 0.54
    ngram_weights: list[float] = dataclasses.field(
        default_factory=lambda: [0.01, 0.04, 0.15, 0.18, 0.12])
    penalty: float = 200.0
    table: str = ""

    def __post_init__(self):
        s = "decode.superposed"
        object.__setattr__(self, "ngram_weights", tuple(float(w) for w in self.ngram_weights))
        check_range(s, "num_drafts", self.num_drafts, low=1)
        check_range(s, "num_candidates", self.num_candidates, low=1)
        check_range(s, "temperature", self.temperature, low=0.0, low_inclusive=False)
        check_range(s, "alpha", self.alpha, low=0.0, high=1.0, high_inclusive=False)
        check_range(s, "penalty", self.penalty, low=0.0)
        if self.alpha > 0 and not self.ngram_weights:
            raise CadenzaError("alpha > 0 needs at least one n-gram weight",
                               where="decode.superposed.ngram_weights",
                               fix="give weights or set alpha=0 to switch the n-gram off")
        for w in self.ngram_weights:
            check_range(s, "ngram_weights[i]", w, low=0.0)

    @property
    def history_len(self) -> int:
        """Tokens of context kept per draft for the n-gram lookup."""
        return max(len(self.ngram_weights), 1)


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    """``decode.proxy``: proxy-tuning / EFT partners of greedy and sample decoding.

    ``logits = base + alpha * (expert - anti)``; ``expert`` (small tuned) and
    ``anti`` (small untuned) are model directories sharing the base's tokenizer.
    """

    alpha: float = 1.0
    expert: str = ""
    anti: str = ""

    def __post_init__(self):
        require(bool(self.expert) == bool(self.anti), "decode.proxy",
                "proxy-tuning needs both an expert and an anti-expert model",
                "set both decode.proxy.expert and decode.proxy.anti (--proxy-expert/--proxy-anti)")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Decoding: the method, the shared settings, and one section per method.

    Stopping: a row stops at a token in ``stop_token_ids`` or at the EOS id
    (the tokenizer's, else the model config's; not if ``ignore_eos``), at a
    string in ``stop`` (matched on the decoded text every ``chunk_steps``
    steps; needs a tokenizer), or after ``max_new_tokens``.
    ``max_len``: KV-cache slots per row; 0 = longest prompt + max_new_tokens.
    ``chunk_steps``: steps per on-device chunk when streaming or matching
    stop strings (one host sync per chunk). ``seed``: row i uses ``seed + i``.
    ``kv_cache``: ``auto`` stores the model's KV cache in the compute dtype, ``int8``
    as int8 with per-token, per-head scales (:mod:`cadenza.models.cache`; a draft
    model's cache stays in its compute dtype).
    """

    method: str = "greedy"
    max_new_tokens: int = 64
    seed: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    max_len: int = 0
    chunk_steps: int = 32
    kv_cache: str = "auto"
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    speculative: SpeculativeConfig = dataclasses.field(default_factory=SpeculativeConfig)
    medusa: MedusaConfig = dataclasses.field(default_factory=MedusaConfig)
    superposed: SuperposedConfig = dataclasses.field(default_factory=SuperposedConfig)
    recycling: RecyclingConfig = dataclasses.field(default_factory=RecyclingConfig)
    layer_skip: LayerSkipConfig = dataclasses.field(default_factory=LayerSkipConfig)
    proxy: ProxyConfig = dataclasses.field(default_factory=ProxyConfig)

    def __post_init__(self):
        from cadenza.decode.registry import REGISTRY  # the method names (no JAX imported)

        s = "decode"
        check_choice(s, "method", self.method, tuple(REGISTRY))
        check_range(s, "max_new_tokens", self.max_new_tokens, low=1)
        check_range(s, "max_len", self.max_len, low=0)
        check_range(s, "chunk_steps", self.chunk_steps, low=1)
        check_choice(s, "kv_cache", self.kv_cache, ("auto", "int8"))
        for i, text in enumerate(self.stop):
            require(bool(text), f"decode.stop[{i}]", "a stop string is empty",
                    "remove it or give at least one character")
        for i, t in enumerate(self.stop_token_ids):
            check_range(s, f"stop_token_ids[{i}]", t, low=0)
        require(self.speculative.adaptive == "none" or self.method == "speculative",
                "decode.speculative.adaptive", "an adaptive draft length needs a draft model",
                "set decode.method=speculative, or adaptive=none")

    def sampling_spec(self) -> SamplingSpec:
        """The static sampler settings: ``sample`` for method sample and for speculative
        methods with ``speculative.sample``, else greedy (validated)."""
        sample = self.method == "sample" or (
            self.method in SPECULATIVE_METHODS and self.speculative.sample)
        return self.sampling.spec("sample" if sample else "greedy")


def with_fields(config: DecodeConfig, **fields) -> DecodeConfig:
    """``config`` with fields replaced; ``"section.field"`` keys (given as
    ``section__field``) replace a field of a method section."""
    top, sections = {}, {}
    for k, v in fields.items():
        if "__" in k:
            sec, name = k.split("__", 1)
            sections.setdefault(sec, {})[name] = v
        else:
            top[k] = v
    for sec, vals in sections.items():
        top[sec] = dataclasses.replace(getattr(config, sec), **vals)
    return dataclasses.replace(config, **top)


# Fields of the flat ``decode`` section written before the per-method sections existed:
# old name -> "section.field" (or "method" logic below).
_LEGACY = {"temperature": "sampling.temperature", "top_k": "sampling.top_k",
           "top_p": "sampling.top_p", "min_p": "sampling.min_p",
           "repetition_penalty": "sampling.repetition_penalty",
           "draft": "speculative.draft", "gamma": "speculative.gamma",
           "adaptive": "speculative.adaptive",
           "adaptive_threshold": "speculative.adaptive_threshold",
           "adaptive_min": "speculative.adaptive_min",
           "accept_head": "speculative.accept_head", "ngram_max": "speculative.ngram_max",
           "ngram_min": "speculative.ngram_min", "heads": "medusa.heads",
           "proxy_alpha": "proxy.alpha"}


def upgrade_legacy_decode(section: dict) -> tuple[dict, list[str]]:
    """A ``decode`` mapping as written by older cadenza versions (flat fields such as
    ``temperature``, ``speculative: draft``, ``heads``) in today's layout (one section
    per method), and the names of the fields moved. A mapping in today's layout comes
    back unchanged with no names. Used when reading saved ``config.yaml`` files, so
    that model directories written before the split still load."""
    old = {k for k in section if k in _LEGACY}
    legacy_spec = isinstance(section.get("speculative"), str)
    if not old and not legacy_spec:
        return section, []
    out = {k: v for k, v in section.items() if k not in old and k != "speculative"}
    if not legacy_spec and "speculative" in section:
        out["speculative"] = section["speculative"]
    for k in sorted(old):
        sec, field = _LEGACY[k].split(".")
        out.setdefault(sec, {})[field] = section[k]
    moved = sorted(old)
    if legacy_spec:
        kind = section["speculative"]
        moved.append("speculative")
        if kind != "none":
            out.setdefault("speculative", {})["sample"] = section.get("method") == "sample"
            out["method"] = {"draft": "speculative"}.get(kind, kind)
    return out, moved
