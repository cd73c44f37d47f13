"""Config section ``decode``: decoding method and sampling settings.

:class:`SamplingSpec` (the static part the jitted samplers read) lives here
too, so that validating a config never imports JAX.
"""

import dataclasses

from cadenza.validation import check_choice, check_range, require

METHODS = ("greedy", "sample")
SPECULATIVE = ("none", "draft", "ngram", "medusa")
ADAPTIVE = ("none", "confidence", "head")


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
        s = "decode"
        check_choice(s, "method", self.method, METHODS)
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
class DecodeConfig:
    """Decoding method and sampling settings.

    Stopping: a row stops at a token in ``stop_token_ids`` or at the EOS id
    (the tokenizer's, else the model config's; not if ``ignore_eos``), at a
    string in ``stop`` (matched on the decoded text every ``chunk_steps``
    steps; needs a tokenizer), or after ``max_new_tokens``.
    ``max_len``: KV-cache slots per row; 0 = longest prompt + max_new_tokens.
    ``chunk_steps``: steps per on-device chunk when streaming or matching
    stop strings (one host sync per chunk).
    ``proxy_alpha``: weight of (expert - anti) logits in proxy-tuning / EFT.

    Speculative decoding (:mod:`cadenza.decode.speculative`; lossless: greedy
    output equals plain greedy, samples follow the target): ``speculative``
    ``"draft"`` (a draft model at ``draft``, a model directory), ``"ngram"``
    (prompt lookup, n-grams of ``ngram_max`` down to ``ngram_min`` tokens) or
    ``"medusa"`` (trained Medusa heads and their tree at ``heads``, a head directory);
    ``gamma`` draft tokens per round (the maximum when adaptive; not used by medusa);
    ``adaptive`` ``"confidence"`` (training-free) or ``"head"`` (SpecDec++,
    head directory ``accept_head``) stops a draft once ``1 - prod(a) >
    adaptive_threshold`` after at least ``adaptive_min`` tokens.
    """

    method: str = "greedy"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    max_len: int = 0
    chunk_steps: int = 32
    proxy_alpha: float = 1.0
    speculative: str = "none"
    draft: str = ""
    gamma: int = 4
    adaptive: str = "none"
    adaptive_threshold: float = 0.3
    adaptive_min: int = 2
    accept_head: str = ""
    heads: str = ""
    ngram_max: int = 3
    ngram_min: int = 1

    def __post_init__(self):
        s = "decode"
        check_choice(s, "speculative", self.speculative, SPECULATIVE)
        check_choice(s, "adaptive", self.adaptive, ADAPTIVE)
        check_range(s, "gamma", self.gamma, low=1)
        check_range(s, "adaptive_threshold", self.adaptive_threshold, low=0.0, high=1.0,
                    low_inclusive=False, high_inclusive=False)
        check_range(s, "adaptive_min", self.adaptive_min, low=1)
        check_range(s, "ngram_min", self.ngram_min, low=1)
        check_range(s, "ngram_max", self.ngram_max, low=self.ngram_min)
        require(self.speculative != "draft" or bool(self.draft), "decode.draft",
                "speculative=draft needs a draft model directory", "set decode.draft (--draft)")
        require(self.speculative != "medusa" or bool(self.heads), "decode.heads",
                "speculative=medusa needs a trained Medusa head directory",
                "set decode.heads (--heads)")
        require(self.adaptive == "none" or self.speculative == "draft", "decode.adaptive",
                "an adaptive draft length needs speculative=draft", "set decode.speculative")
        require(self.adaptive != "head" or bool(self.accept_head), "decode.accept_head",
                "adaptive=head needs a trained SpecDec++ head directory",
                "set decode.accept_head (--accept-head), or use adaptive=confidence")
        self.sampling_spec()
        check_range(s, "max_new_tokens", self.max_new_tokens, low=1)
        check_range(s, "max_len", self.max_len, low=0)
        check_range(s, "chunk_steps", self.chunk_steps, low=1)
        for i, text in enumerate(self.stop):
            require(bool(text), f"decode.stop[{i}]", "a stop string is empty",
                    "remove it or give at least one character")
        for i, t in enumerate(self.stop_token_ids):
            check_range(s, f"stop_token_ids[{i}]", t, low=0)

    def sampling_spec(self) -> SamplingSpec:
        """The static sampler settings (validated)."""
        return SamplingSpec(method=self.method, temperature=self.temperature, top_k=self.top_k,
                            top_p=self.top_p, min_p=self.min_p,
                            repetition_penalty=self.repetition_penalty)
