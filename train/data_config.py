"""Config section ``data``: where training examples come from and how they are shaped."""

import dataclasses
from typing import Optional

from cadenza.validation import check_choice


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training examples come from and how they are shaped."""

    format: str = "stdlib_code"
    path: Optional[str] = None
    data_dir: Optional[str] = None
    packing: bool = True
    seed: int = 0

    def __post_init__(self):
        check_choice("data", "format", self.format,
                     ("stdlib_code", "stdlib_instruct", "alpaca", "sharegpt", "messages", "text",
                      "tfds"))
