"""Config section ``decode``: decoding method and sampling settings."""

import dataclasses

from cadenza.validation import check_choice, check_range


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Decoding method and sampling settings."""

    method: str = "greedy"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        s = "decode"
        check_choice(s, "method", self.method, ("greedy", "sample"))
        check_range(s, "max_new_tokens", self.max_new_tokens, low=1)
        check_range(s, "temperature", self.temperature, low=0.0, low_inclusive=False)
        check_range(s, "top_k", self.top_k, low=0)
        check_range(s, "top_p", self.top_p, low=0.0, high=1.0, low_inclusive=False)
        check_range(s, "min_p", self.min_p, low=0.0, high=1.0, high_inclusive=False)
        check_range(s, "repetition_penalty", self.repetition_penalty, low=0.0,
                    low_inclusive=False)
