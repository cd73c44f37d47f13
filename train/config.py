"""Config sections of the training core: the device mesh and the optimisation run."""

import dataclasses
from typing import Optional

from cadenza.errors import ConfigError
from cadenza.validation import check_choice, check_range

MESH_AXES = ("data", "fsdp", "tensor", "sequence", "expert")

DEFAULT_LOGICAL_AXIS_RULES = {
    "batch": ["data", "fsdp"],
    "length": ["sequence"],
    "embed": ["fsdp"],
    "vocab": ["tensor"],
    "heads": ["tensor"],
    "kv_heads": ["tensor"],
    "head_dim": [],
    "mlp": ["tensor"],
    "expert": ["expert"],
    "expert_mlp": ["tensor"],
    "layers": [],
    "cache_length": [],
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape and logical-to-mesh axis rules.

    Axis sizes multiply to the device count; one size may be -1 ("the rest").
    ``logical_axis_rules`` maps each logical axis name used by the model to
    the mesh axes it is sharded over (an empty list means replicated).
    ``expert`` shards mixture-of-experts weights by expert (expert parallelism).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    expert: int = 1
    logical_axis_rules: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_LOGICAL_AXIS_RULES.items()})

    def __post_init__(self):
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        for axis, size in sizes.items():
            if size == 0 or size < -1:
                raise ConfigError(f"mesh axis size {size} is invalid", where=f"mesh.{axis}",
                                  fix="use a positive size, or -1 for 'the rest of the devices'")
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError("more than one mesh axis is -1", where="mesh",
                              fix="give at most one axis the size -1")
        for logical, axes in self.logical_axis_rules.items():
            for axis in axes:
                if axis not in MESH_AXES:
                    raise ConfigError(f"unknown mesh axis {axis!r}",
                                      where=f"mesh.logical_axis_rules.{logical}",
                                      fix=f"use mesh axes from {MESH_AXES}")

    def rules(self) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
        """The rules in Flax's ``logical_axis_rules`` form."""
        return tuple((k, tuple(v) if v else None) for k, v in self.logical_axis_rules.items())


TASKS = ("lm", "medusa", "hydra", "specdec", "dpo", "orpo", "distill")
HEAD_TASKS = ("medusa", "hydra", "specdec")
PREFERENCE_TASKS = ("dpo", "orpo")


@dataclasses.dataclass(frozen=True)
class PreferenceTrainConfig:
    """``train.preference``: the objective of ``train.task`` dpo / orpo on preference pairs.

    DPO: ``beta`` scales the policy-vs-reference log-ratio; ``loss`` is ``sigmoid``
    (the DPO paper), ``ipo`` (squared distance of the length-averaged log-ratio margin
    to ``1 / (2 beta)``) or ``hinge`` (``relu(1 - beta * margin)``). ORPO: the chosen
    response's length-averaged NLL plus ``orpo_lambda`` times the odds-ratio term.
    """

    beta: float = 0.1
    loss: str = "sigmoid"
    orpo_lambda: float = 0.1

    def __post_init__(self):
        s = "train.preference"
        check_range(s, "beta", self.beta, low=0.0, low_inclusive=False)
        check_choice(s, "loss", self.loss, ("sigmoid", "ipo", "hinge"))
        check_range(s, "orpo_lambda", self.orpo_lambda, low=0.0)


@dataclasses.dataclass(frozen=True)
class MedusaTrainConfig:
    """``train.medusa``: Medusa-1 heads (``train.task: medusa``) or Hydra heads (``train.task:
    hydra``, the same fields) on the frozen ``train.init_from`` model.

    ``num_heads`` heads of ``blocks`` residual blocks each; head k's cross-entropy is
    weighted ``decay**k``. ``tree``: the decoding tree saved with the heads, a list of
    index paths (e.g. ``[[0], [1], [0, 0]]``), at most ``num_heads`` deep; empty = the
    default tree (:data:`cadenza.decode.medusa.DEFAULT_PATHS`) cut to ``num_heads``.
    """

    num_heads: int = 4
    blocks: int = 1
    decay: float = 0.8
    tree: list[list[int]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        s = "train.medusa"
        check_range(s, "num_heads", self.num_heads, low=1)
        check_range(s, "blocks", self.blocks, low=1)
        check_range(s, "decay", self.decay, low=0.0, high=1.0, low_inclusive=False)
        for i, path in enumerate(self.tree):
            if not path or min(path) < 0 or len(path) > self.num_heads:
                raise ConfigError(f"tree path {list(path)} is not 1..{self.num_heads} "
                                  "indices >= 0", where=f"{s}.tree[{i}]",
                                  fix="give paths like [0], [0, 1], no deeper than num_heads")
            if len(path) > 1 and list(path[:-1]) not in [list(p) for p in self.tree]:
                raise ConfigError(f"tree path {list(path)} has no parent {list(path[:-1])}",
                                  where=f"{s}.tree[{i}]", fix="add the parent path too")


@dataclasses.dataclass(frozen=True)
class SpecDecTrainConfig:
    """``train.specdec``: the SpecDec++ acceptance head of the draft model ``draft`` (a model
    directory) against the target ``train.init_from`` (both frozen). ``blocks`` residual
    blocks; rejections weigh ``reject_weight``; a random ``keep_fraction`` of positions keep
    the true token (no loss there)."""

    draft: Optional[str] = None
    blocks: int = 3
    reject_weight: float = 6.0
    keep_fraction: float = 0.15

    def __post_init__(self):
        s = "train.specdec"
        check_range(s, "blocks", self.blocks, low=1)
        check_range(s, "reject_weight", self.reject_weight, low=0.0, low_inclusive=False)
        check_range(s, "keep_fraction", self.keep_fraction, low=0.0, high=1.0,
                    high_inclusive=False)


DISTILL_LOSSES = ("forward_kl", "reverse_kl", "tv")


@dataclasses.dataclass(frozen=True)
class DistillTrainConfig:
    """``train.distill``: a draft model (the student, the experiment's ``model`` section)
    learns the frozen teacher ``train.init_from``. ``student``: a model directory or Hugging
    Face folder saved for the ``model`` section to start from; empty = random init. ``loss``
    per counted token, temperature 1: ``forward_kl`` KL(teacher || student), ``reverse_kl``
    KL(student || teacher) or ``tv`` (total variation; acceptance = 1 - TV).

    ``on_policy``: train on the teacher's own generations instead of the data section's
    text: ``prompts`` prompts (the first ``prompt_len`` tokens of training rows of the data
    section) continued by ``new_tokens`` tokens with cadenza's generate, ``gen_batch``
    prompts per call, at ``temperature`` (0 = greedy), seeded by ``train.seed``; only the
    continuations are counted. They are generated once and cached under
    ``<output_dir>/on_policy/``, keyed by a fingerprint of the teacher, the prompts and
    these settings. ``prompt_len + new_tokens`` must fit ``train.seq_len + 1``.
    """

    student: Optional[str] = None
    loss: str = "forward_kl"
    on_policy: bool = False
    prompts: int = 64
    prompt_len: int = 32
    new_tokens: int = 96
    gen_batch: int = 16
    temperature: float = 1.0

    def __post_init__(self):
        s = "train.distill"
        check_choice(s, "loss", self.loss, DISTILL_LOSSES)
        for name in ("prompts", "prompt_len", "new_tokens", "gen_batch"):
            check_range(s, name, getattr(self, name), low=1)
        check_range(s, "temperature", self.temperature, low=0.0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run settings of ``cadenza train``.

    ``steps`` counts optimizer updates; each consumes one global batch of
    ``batch_size`` rows of ``seq_len`` tokens, split into ``microbatches``
    accumulated with ``lax.scan``. The learning rate warms up linearly from 0
    over ``warmup_steps`` then follows ``schedule`` down to
    ``learning_rate * min_lr_ratio`` at ``steps`` (``constant`` stays flat).
    ``grad_clip_norm`` of 0 disables clipping; ``z_loss`` adds
    ``z_loss * logsumexp(logits)**2`` per counted token. ``eval_every`` /
    ``checkpoint_every`` of 0 disable periodic eval / saves (a checkpoint is
    always written at the end). ``peak_tflops_per_device`` of 0 looks the
    accelerator up by name for MFU (unknown devices report no MFU).
    ``init_from``: a model directory (``cadenza.models.save_model``) or a Hugging Face
    folder (config.json + safetensors) whose params start the run: the frozen base for
    PEFT, the starting point of full fine-tuning; None starts from random init (PEFT
    needs a base). Its tokenizer is the data's unless ``data.tokenizer`` is set.
    Logging: every ``log_every`` steps a line goes to ``metrics.jsonl``, ``train.log``
    (and stdout unless a progress bar is shown: only on a terminal), TensorBoard
    (``tensorboard``; tags ``train/...``, ``eval/...``, the config as hyperparameters)
    and Weights & Biases when ``wandb_project`` is set.
    ``task``: what is trained: ``lm`` (the model, or PEFT adapters), ``medusa`` (Medusa
    heads, section ``medusa``), ``hydra`` (Hydra heads, section ``medusa``), ``specdec``
    (the SpecDec++ head, section ``specdec``) or
    ``distill`` (a draft model distilled from ``init_from``, section ``distill``);
    the head tasks keep ``init_from`` frozen and write a head directory to
    ``<output_dir>/adapters`` instead of a model; ``distill`` keeps it frozen as the
    teacher and writes the student to ``<output_dir>/model``. ``dpo`` / ``orpo`` train the model (or
    PEFT adapters) on preference pairs (section ``preference``); DPO's reference is the
    ``init_from`` model.
    """

    output_dir: str = "runs/default"
    seed: int = 0
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256
    microbatches: int = 1
    optimizer: str = "adamw"
    learning_rate: float = 3e-4
    schedule: str = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9
    grad_clip_norm: float = 1.0
    z_loss: float = 0.0
    log_every: int = 10
    eval_every: int = 0
    eval_steps: int = 4
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    async_checkpoints: bool = True
    tensorboard: bool = True
    progress_bar: bool = True               # only on a terminal; else text log lines
    wandb_project: Optional[str] = None     # log to Weights & Biases (the wandb extra)
    peak_tflops_per_device: float = 0.0
    init_from: Optional[str] = None
    task: str = "lm"
    medusa: MedusaTrainConfig = dataclasses.field(default_factory=MedusaTrainConfig)
    specdec: SpecDecTrainConfig = dataclasses.field(default_factory=SpecDecTrainConfig)
    preference: PreferenceTrainConfig = dataclasses.field(default_factory=PreferenceTrainConfig)
    distill: DistillTrainConfig = dataclasses.field(default_factory=DistillTrainConfig)

    def __post_init__(self):
        s = "train"
        check_choice(s, "task", self.task, TASKS)
        if self.task == "dpo" and not self.init_from:
            raise ConfigError("train.task=dpo needs the reference model (the SFT model it "
                              "starts from)", where="train.init_from",
                              fix="set train.init_from to the model directory")
        if self.task in HEAD_TASKS + ("distill",) and not self.init_from:
            role = "a student from" if self.task == "distill" else "heads on"
            raise ConfigError(f"train.task={self.task} trains {role} a frozen model, but "
                              "none is given", where="train.init_from",
                              fix="set train.init_from to the model directory")
        if self.task == "distill" and self.distill.on_policy and (
                self.distill.prompt_len + self.distill.new_tokens > self.seq_len + 1):
            raise ConfigError(f"on-policy sequences of prompt_len {self.distill.prompt_len} + "
                              f"new_tokens {self.distill.new_tokens} tokens do not fit "
                              f"train.seq_len + 1 = {self.seq_len + 1}",
                              where="train.distill.new_tokens",
                              fix="lower train.distill.prompt_len / new_tokens or raise "
                                  "train.seq_len")
        if self.task == "specdec" and not self.specdec.draft:
            raise ConfigError("train.task=specdec needs the draft model", where="train.specdec"
                              ".draft", fix="set train.specdec.draft to a model directory")
        for name in ("steps", "batch_size", "seq_len", "microbatches", "log_every",
                     "keep_checkpoints", "eval_steps"):
            check_range(s, name, getattr(self, name), low=1)
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "weight_decay",
                     "grad_clip_norm", "z_loss", "peak_tflops_per_device"):
            check_range(s, name, getattr(self, name), low=0)
        check_range(s, "learning_rate", self.learning_rate, low=0.0, low_inclusive=False)
        check_range(s, "min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        for name in ("b1", "b2", "momentum"):
            check_range(s, name, getattr(self, name), low=0.0, high=1.0, high_inclusive=False)
        check_range(s, "eps", self.eps, low=0.0)
        check_choice(s, "optimizer", self.optimizer, ("adamw", "adafactor", "lion", "sgd"))
        check_choice(s, "schedule", self.schedule, ("cosine", "linear", "constant"))
        if self.batch_size % self.microbatches:
            raise ConfigError(
                f"batch_size={self.batch_size} is not divisible by "
                f"microbatches={self.microbatches}",
                where="train.microbatches", fix="choose microbatches dividing batch_size")
