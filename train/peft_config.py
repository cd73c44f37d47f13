"""Config section ``peft``: the adapter method and its hyperparameters."""

import dataclasses

from cadenza.validation import check_choice, check_range


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Parameter-efficient fine-tuning: the method and its hyperparameters."""

    method: str = "none"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = r".*attn\.(q|k|v|o)_proj"

    def __post_init__(self):
        s = "peft"
        check_choice(s, "method", self.method,
                     ("none", "lora", "lora_plus", "dora", "qlora", "ia3", "prefix", "prompt"))
        check_range(s, "rank", self.rank, low=1)
        check_range(s, "alpha", self.alpha, low=0.0, low_inclusive=False)
        check_range(s, "dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False)
