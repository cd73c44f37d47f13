"""Config section ``lud``: Lexical Unit Decoding (marking, placeholder data, decoding).

LUD (Sun et al., 2024) has no reference code; every field below is one of
cadenza's reconstruction choices and is documented where it is used
(:mod:`cadenza.train.lud_data`, :mod:`cadenza.train.lud_task`,
:mod:`cadenza.decode.lud`).
"""

import dataclasses

from cadenza.errors import ConfigError
from cadenza.validation import check_choice, check_range


@dataclasses.dataclass(frozen=True)
class LudConfig:
    """Lexical Unit Decoding settings.

    Attributes:
      placeholder_id: the token id fed at placeholder slots; -1 = the last vocabulary row
        (``vocab_size - 1``). It must not be the pad, BOS or EOS id, and should be an id the
        tokenizer never produces (the byte corpus uses ids 3..258 of the tiny preset's 512).
        Fine-tuning initialises its embedding row to the mean embedding.
      alpha: marking threshold: a token is confident when p(y_t | y_<t) >= alpha.
      max_unit: k, the longest lexical unit (so at most k - 1 placeholders per unit).
      marking: "run" = a unit is a maximal run of confident tokens (split into chunks of
        at most k); "head" = the alternative reading, a unit is the token before a run
        (any confidence) followed by the run.
      placeholder_weight: loss weight of placeholder targets (real tokens weigh 1).
      real_fraction: real tokens per packed row, as a fraction of ``train.seq_len``; the
        rest of the row holds the placeholders (overflow truncates the row, see data stats).
      lookahead: m, placeholders appended per decoding step (0 = plain greedy decoding).
      beta: acceptance threshold on a placeholder's top probability (> 1 = accept none).
      cut_repeats: stop accepting at a placeholder token equal to its predecessor.
      base_model: a model directory to fine-tune from ('' = the caller passes params).
    """

    placeholder_id: int = -1
    alpha: float = 0.9
    max_unit: int = 4
    marking: str = "run"
    placeholder_weight: float = 1.0
    real_fraction: float = 0.75
    lookahead: int = 3
    beta: float = 0.9
    cut_repeats: bool = True
    base_model: str = ""

    def __post_init__(self):
        s = "lud"
        check_range(s, "placeholder_id", self.placeholder_id, low=-1)
        check_range(s, "alpha", self.alpha, low=0.0, low_inclusive=False)
        check_range(s, "max_unit", self.max_unit, low=1)
        check_choice(s, "marking", self.marking, ("run", "head"))
        check_range(s, "placeholder_weight", self.placeholder_weight, low=0.0)
        check_range(s, "real_fraction", self.real_fraction, low=0.0, high=1.0,
                    low_inclusive=False)
        check_range(s, "lookahead", self.lookahead, low=0)
        check_range(s, "beta", self.beta, low=0.0)

    def placeholder_for(self, model_config) -> int:
        """The placeholder id for ``model_config`` (-1 = its last vocabulary row).

        Raises ConfigError unless it is a vocabulary row other than pad/BOS/EOS.
        """
        pid = model_config.vocab_size - 1 if self.placeholder_id == -1 else self.placeholder_id
        special = {model_config.pad_token_id, model_config.bos_token_id,
                   model_config.eos_token_id}
        if not 0 <= pid < model_config.vocab_size or pid in special:
            raise ConfigError(f"placeholder id {pid} is outside the vocabulary "
                              f"(0..{model_config.vocab_size - 1}) or a pad/BOS/EOS id",
                              where="lud.placeholder_id",
                              fix="use -1 (the last row) or another id the tokenizer never emits")
        return pid
