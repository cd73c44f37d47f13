"""Config section ``data``: where training examples come from and how they are shaped."""

import dataclasses
import math
from typing import Optional

from cadenza.errors import ConfigError
from cadenza.validation import check_choice, check_range

FORMATS = ("stdlib_code", "stdlib_instruct", "alpaca", "sharegpt", "messages", "text", "tfds",
           "preference")


def _check_source(where: str, format: str, path, name) -> None:
    check_choice(where, "format", format, FORMATS)
    if format in ("alpaca", "sharegpt", "messages", "text", "preference") and not path:
        raise ConfigError(f"format {format!r} reads local files but no path is given",
                          where=f"{where}.path", fix="set path to the input file (or a glob)")
    if format == "tfds" and not name:
        raise ConfigError("format 'tfds' needs the name of a prepared dataset",
                          where=f"{where}.name",
                          fix="set name, e.g. my_dataset or my_dataset/config:1.0.0")


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One dataset of a mixture: ``format`` + ``path`` (local files) or ``name`` (TFDS)."""

    format: str = "stdlib_code"
    path: Optional[str] = None
    name: Optional[str] = None
    weight: float = 1.0

    def __post_init__(self):
        _check_source("data.mixture", self.format, self.path, self.name)
        check_range("data.mixture", "weight", self.weight, low=0.0, low_inclusive=False)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training examples come from and how they are shaped.

    One dataset (``format``/``path``/``name``) or a weighted ``mixture`` (weights
    must sum to one). Local files and the stdlib datasets are prepared as TFDS
    array_record datasets under ``data_dir`` (``cadenza data build``); ``format:
    tfds`` loads a dataset already prepared there by name.
    """

    format: str = "stdlib_code"
    path: Optional[str] = None
    name: Optional[str] = None
    mixture: list[DataSource] = dataclasses.field(default_factory=list)
    data_dir: Optional[str] = None          # default: ~/.cache/cadenza/datasets
    tokenizer: Optional[str] = None         # default: a BPE trained on the stdlib (model vocab)
    on_error: str = "skip"                  # skip (count and log) | stop (raise at the record)
    packing: bool = True
    packing_method: str = "first_fit"       # first_fit | best_fit
    packing_bins: int = 8
    truncation: str = "truncate"            # truncate | drop | chunk (examples > seq_len)
    seed: int = 0
    shuffle: bool = True
    shuffle_window: int = 1024              # chunk: pieces shuffled together (train); 0 = off
    shard_by: str = "records"               # records | files (each host opens only its files)
    num_shards: Optional[int] = None        # array_record files per split when building
    heldout_fraction: float = 0.05          # share of records (stdlib: of modules) in "test"
    stdlib_modules: Optional[list[str]] = None  # restrict the stdlib datasets (e.g. in tests)
    end_of_turn: Optional[list[str]] = None     # strings ending assistant turns (default: EOS,
    #                                             <|eot_id|>, <|im_end|>, <end_of_turn>, ...)
    neftune_alpha: float = 0.0              # NEFTune noise scale; 0 = off (training only)
    worker_count: int = 0                   # grain multiprocessing workers; 0 = in-process
    response_mask_prob: float = 0.0         # Masked Thought: response inputs masked (training)
    response_mask_id: Optional[int] = None  # the id they become (default: model.pad_token_id)
    balance: str = "tokens"                 # tokens: one token mean | sources: mean of the
    #                                         mixture sources' token means (task-balanced)

    def __post_init__(self):
        s = "data"
        if not self.mixture:
            _check_source(s, self.format, self.path, self.name)
        else:
            total = sum(m.weight for m in self.mixture)
            if not math.isclose(total, 1.0, abs_tol=1e-6):
                raise ConfigError(f"mixture weights sum to {total:g}, not 1",
                                  where="data.mixture",
                                  fix="give weights that sum to one, e.g. 0.7 and 0.3")
        formats = {m.format for m in self.sources()}
        if "preference" in formats and len(formats) > 1:
            others = sorted(formats - {"preference"})
            raise ConfigError(f"a mixture mixes preference pairs with {others} examples",
                              where="data.mixture",
                              fix="train preference pairs (train.task dpo/orpo) in their own "
                                  "run, after SFT on the other data")
        check_choice(s, "on_error", self.on_error, ("skip", "stop"))
        check_choice(s, "packing_method", self.packing_method, ("first_fit", "best_fit"))
        check_choice(s, "truncation", self.truncation, ("truncate", "drop", "chunk"))
        check_choice(s, "shard_by", self.shard_by, ("records", "files"))
        check_range(s, "packing_bins", self.packing_bins, low=1)
        check_range(s, "shuffle_window", self.shuffle_window, low=0)
        check_range(s, "num_shards", self.num_shards, low=1, optional=True)
        check_range(s, "heldout_fraction", self.heldout_fraction, low=0.0, high=1.0,
                    high_inclusive=False)
        check_range(s, "neftune_alpha", self.neftune_alpha, low=0.0)
        check_range(s, "worker_count", self.worker_count, low=0)
        check_range(s, "response_mask_prob", self.response_mask_prob, low=0.0, high=1.0,
                    high_inclusive=False)
        check_range(s, "response_mask_id", self.response_mask_id, low=0, optional=True)
        check_choice(s, "balance", self.balance, ("tokens", "sources"))

    @property
    def is_preference(self) -> bool:
        """True when the data are preference pairs (``format: preference``)."""
        return all(m.format == "preference" for m in self.sources())

    def sources(self) -> list[DataSource]:
        """The datasets to read: the mixture, or the single source with weight 1."""
        return list(self.mixture) or [DataSource(self.format, self.path, self.name, 1.0)]
