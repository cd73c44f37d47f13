"""Config section ``peft``: the adapter method and its hyperparameters.

Methods: ``none`` (full fine-tuning), ``lora``, ``lora_plus`` (LoRA with the
learning rate of B = ``lora_plus_ratio`` x that of A), ``dora``, ``qlora``
(LoRA on a base whose targeted kernels are stored NF4 or int8), ``ia3``,
``prefix`` and ``prompt``, and the selective methods that train part of the model's own
weights (:mod:`cadenza.train.peft.selective`): ``partial`` (params matching ``trainable``,
layers ``trainable_layers``), ``lisa`` (``lisa_layers`` sampled layers every ``period``
steps) and ``hft`` (a random half of the matrices every ``period`` steps). ``targets`` is a
regex matched (``re.fullmatch``) against projection module paths such as
``layers.attn.q_proj`` (scanned) or ``layer_3.mlp.down_proj`` (unscanned); None picks the
method's default.
"""

import dataclasses
import math
import re
from typing import Optional

from cadenza.validation import check_choice, check_range, require

METHODS = ("none", "lora", "lora_plus", "dora", "qlora", "ia3", "prefix", "prompt",
           "partial", "lisa", "hft")
LORA_METHODS = ("lora", "lora_plus", "dora", "qlora")
DEFAULT_TARGETS = {
    "lora": r".*attn\.(q|k|v|o)_proj",
    "lora_plus": r".*attn\.(q|k|v|o)_proj",
    "dora": r".*attn\.(q|k|v|o)_proj",
    "qlora": r".*_proj",  # all linears of every layer, as in the QLoRA paper
    "ia3": r".*attn\.(k|v)_proj|.*mlp\.down_proj",
}


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Parameter-efficient fine-tuning: the method and its hyperparameters.

    LoRA family: ``rank``, ``alpha`` (scaling alpha/rank, or alpha/sqrt(rank)
    with ``rslora``), ``dropout`` on the adapter input, ``lora_init`` of A
    (``kaiming``: U(+-1/sqrt(fan_in)) as in HF peft, ``gaussian``: N(0, 1/rank)).
    QLoRA: ``quant_type`` nf4|int8 in blocks of ``quant_block_size``;
    ``double_quant`` stores the block absmax in int8 blocks of
    ``double_quant_block_size`` (mean removed). (IA)3: vectors on the outputs
    of the targeted projections, except those matching ``ia3_feedforward``
    whose inputs are scaled. Prefix/prompt: ``num_virtual_tokens``;
    ``prefix_projection`` reparameterises the prefix by an MLP of width
    ``prefix_hidden_size`` (0 = model hidden size); ``prompt_init`` is
    random | sample_vocab | tokens (``prompt_init_ids``, one id per virtual token).
    """

    method: str = "none"
    targets: Optional[str] = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    lora_init: str = "kaiming"
    lora_plus_ratio: float = 16.0
    quant_type: str = "nf4"
    quant_block_size: int = 64
    double_quant: bool = True
    double_quant_block_size: int = 256
    ia3_feedforward: str = r".*mlp\.down_proj"
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    prefix_hidden_size: int = 0
    prompt_init: str = "random"
    prompt_init_ids: list[int] = dataclasses.field(default_factory=list)
    trainable: Optional[str] = None
    trainable_layers: list[int] = dataclasses.field(default_factory=list)
    lisa_layers: int = 2
    period: int = 20

    def __post_init__(self):
        s = "peft"
        check_choice(s, "method", self.method, METHODS)
        check_range(s, "rank", self.rank, low=1)
        check_range(s, "alpha", self.alpha, low=0.0, low_inclusive=False)
        check_range(s, "dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False)
        check_choice(s, "lora_init", self.lora_init, ("kaiming", "gaussian"))
        check_range(s, "lora_plus_ratio", self.lora_plus_ratio, low=0.0, low_inclusive=False)
        check_choice(s, "quant_type", self.quant_type, ("nf4", "int8"))
        check_range(s, "quant_block_size", self.quant_block_size, low=2)
        require(self.quant_block_size % 2 == 0, "peft.quant_block_size",
                f"quant_block_size={self.quant_block_size} is odd (NF4 packs two codes a byte)",
                "use an even block size such as 64")
        check_range(s, "double_quant_block_size", self.double_quant_block_size, low=1)
        check_range(s, "num_virtual_tokens", self.num_virtual_tokens, low=1)
        check_range(s, "prefix_hidden_size", self.prefix_hidden_size, low=0)
        check_choice(s, "prompt_init", self.prompt_init, ("random", "sample_vocab", "tokens"))
        require(self.prompt_init != "tokens"
                or len(self.prompt_init_ids) == self.num_virtual_tokens,
                "peft.prompt_init_ids",
                f"prompt_init='tokens' needs {self.num_virtual_tokens} ids "
                f"(num_virtual_tokens), got {len(self.prompt_init_ids)}",
                "give one token id per virtual token")
        require(self.targets is None or self.method in DEFAULT_TARGETS, "peft.targets",
                f"method {self.method!r} takes no targets (it does not wrap projections)",
                "remove peft.targets")
        check_range(s, "lisa_layers", self.lisa_layers, low=1)
        check_range(s, "period", self.period, low=1)
        require((self.trainable is None and not self.trainable_layers)
                or self.method == "partial", "peft.trainable",
                f"method {self.method!r} does not read trainable / trainable_layers",
                "set peft.method=partial, or remove them")
        for field in ("targets", "ia3_feedforward", "trainable"):
            pattern = getattr(self, field)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as e:
                    require(False, f"peft.{field}", f"invalid regex {pattern!r}: {e}",
                            "write a Python regular expression, e.g. '.*attn\\.(q|v)_proj'")

    @property
    def target_regex(self) -> Optional[str]:
        """``targets`` or the method's default (None for methods without targets)."""
        return self.targets if self.targets is not None else DEFAULT_TARGETS.get(self.method)

    @property
    def scaling(self) -> float:
        """LoRA scale s: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
