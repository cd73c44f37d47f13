"""Draft distillation: a small student model learns the frozen teacher's next-token
distributions, so that it agrees with the teacher as a speculative-decoding draft.

The teacher is the ``train.init_from`` model (frozen); the student is the model the
experiment's ``model`` section describes, started from ``train.distill.student`` (a model
directory or Hugging Face folder saved for that model section) or from random init when
that is empty. Every student param trains (full fine-tuning), or with ``peft.method`` set
only the adapters of the saved student (e.g. LoRA on the draft; merged on export).

Loss per counted token (``loss_mask``), temperature 1, p = teacher, q = student:

- ``forward_kl`` (default): ``KL(p || q) = sum_v p (log p - log q)``;
- ``reverse_kl``: ``KL(q || p) = sum_v q (log q - log p)``;
- ``tv``: total variation ``0.5 * sum_v |p - q|``. For one drafted token with
  speculative sampling the acceptance probability is ``1 - TV(p, q)``.

Data: the data section's batches, or with ``train.distill.on_policy`` the teacher's own
generations (:mod:`cadenza.train.distill_data`, cached under the output directory). Every
step logs the draft's ``acceptance`` (mean 1 - TV) and ``top1_agreement`` with the teacher,
on eval batches too.

Before anything compiles the student's and the teacher's vocabulary sizes, and their
tokenizers' fingerprints when both directories hold one, must match. ``cadenza train``
with ``train.task: distill`` writes the student as a normal model directory
(``<output_dir>/model``), usable as ``cadenza generate --method speculative --draft``.
"""

import dataclasses

import jax
import jax.numpy as jnp

from cadenza.errors import ConfigError
from cadenza.remote import local_model_dir
from cadenza.train.config import DISTILL_LOSSES
from cadenza.train.head_fit import abstract_frozen_params, frozen_params
from cadenza.train.task import TrainTask, full_model_task


def distill_divergence(student_logits, teacher_logits, kind: str = "forward_kl"):
    """Per-position divergence between the teacher's and the student's next-token
    distributions (temperature 1).

    Args:
      student_logits, teacher_logits: float [..., V] (the same shape).
      kind: one of :data:`cadenza.train.config.DISTILL_LOSSES`.
    Returns float32 [...]: ``KL(p||q)``, ``KL(q||p)`` or ``TV(p, q)`` with p = softmax of
    the teacher's logits, q = the student's. No gradient flows into the teacher.
    """
    if kind not in DISTILL_LOSSES:
        raise ValueError(f"unknown distillation loss {kind!r}; use one of {DISTILL_LOSSES}")
    logq = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
    if kind == "forward_kl":   # tokens the teacher rules out (p = 0) add nothing
        p = jnp.exp(logp)
        return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)
    if kind == "reverse_kl":
        return jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(logp) - jnp.exp(logq)), axis=-1)


def distill_loss_sums(student_logits, teacher_logits, loss_mask, kind: str = "forward_kl"):
    """``(loss_sum, count)`` of a microbatch: :func:`distill_divergence` [B, T] summed over
    the positions where ``loss_mask`` [B, T] is > 0, and the number of those positions
    (float32 scalars; the loss is their ratio)."""
    mask = (loss_mask > 0).astype(jnp.float32)
    div = distill_divergence(student_logits, teacher_logits, kind)
    return jnp.sum(div * mask), jnp.sum(mask)


def acceptance_sums(student_logits, teacher_logits, loss_mask) -> dict:
    """Draft-quality metrics summed over the counted positions (``loss_mask`` > 0):
    ``acceptance``, ``1 - TV(p, q)`` (the chance that speculative sampling accepts a token the
    student drafts there) and ``top1_agreement``, 1 where the student's and the teacher's
    argmax agree (greedy acceptance). Float32 scalars; divide by the count for means."""
    mask = (loss_mask > 0).astype(jnp.float32)
    tv = distill_divergence(student_logits, teacher_logits, "tv")
    agree = jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)
    return {"acceptance": jnp.sum((1.0 - tv) * mask),
            "top1_agreement": jnp.sum(agree.astype(jnp.float32) * mask)}


def saved_model_config(directory):
    """The ModelConfig of the model directory or Hugging Face folder ``directory``, read
    without its params."""
    from cadenza.config import load_config
    from cadenza.models import load_model
    from cadenza.models.hf_folder import hf_folder_config, is_hf_folder

    d = local_model_dir(directory)
    if is_hf_folder(d):  # config.json and the safetensors headers, no tensor data
        return hf_folder_config(d).model
    if (d / "config.yaml").is_file():
        return load_config(d / "config.yaml").model
    return load_model(d)[0].model  # not a model directory: load_model names the problem


def check_vocabularies(teacher_dir, teacher_config, student_config, student_dir=None) -> None:
    """Raise :class:`ConfigError` (before compiling) unless student and teacher share the
    vocabulary size and, when both directories hold a tokenizer, its fingerprint."""
    from cadenza.models.checkpoint import check_same_tokenizer, tokenizer_dir

    tv, sv = teacher_config.vocab_size, student_config.vocab_size
    if tv != sv:
        raise ConfigError(f"the student's vocabulary ({sv} tokens) differs from the teacher's "
                          f"({tv} tokens, {teacher_dir})", where="train.distill.student"
                          if student_dir else "model.vocab_size",
                          fix="distill into a student with the teacher's tokenizer and "
                              f"vocab_size {tv}")
    if student_dir is None:
        return
    check_same_tokenizer(tokenizer_dir(teacher_dir), tokenizer_dir(student_dir),
                         what="the student",
                         where="train.distill.student",
                         fix="distill into a student that uses the teacher's tokenizer")


def distill_task(config) -> TrainTask:
    """The distillation task of the experiment ``config`` (``train.task: distill``).

    Trainable: the student (``config.model``; from ``train.distill.student`` or random
    init), sharded like any model; with ``peft.method`` set, the PEFT adapters of the saved
    student ``train.distill.student`` (e.g. LoRA on the draft), merged into it on export.
    Frozen: ``{"student": the PEFT student's frozen base ({} for full training),
    "teacher": the teacher's params}`` (``train.init_from``, its own saved model config
    with this run's ``dtype`` and ``attention_impl``). ``apply`` returns the student's
    logits float32 [B, T, V]; ``loss`` the sums of :func:`distill_loss_sums` with
    ``train.distill.loss`` and the metrics of :func:`acceptance_sums` (logged as
    ``acceptance`` / ``top1_agreement``, ``eval_...`` on eval batches); ``export`` the
    student's params (written to ``<output_dir>/model``). With ``train.distill.on_policy``
    the trainer feeds it the teacher's own generations (:mod:`cadenza.train.distill_data`).

    Raises ConfigError (before compiling) for PEFT without a saved student, or a
    vocabulary/tokenizer mismatch.
    """
    from cadenza.models import Transformer

    distill, teacher_dir = config.train.distill, config.train.init_from
    student_dir = distill.student or None
    for field, d in (("train.init_from", teacher_dir), ("train.distill.student", student_dir)):
        if d is not None and not local_model_dir(d).is_dir():
            raise ConfigError(f"no such model directory: {d}", where=field,
                              fix="give a cadenza model directory or a Hugging Face folder")
    peft = config.peft.method != "none"
    if peft and student_dir is None:
        raise ConfigError(f"peft.method={config.peft.method} adapts a saved student, but "
                          "train.distill.student is empty", where="train.distill.student",
                          fix="set it to the draft's model directory, or peft.method=none")
    # the teacher runs with this run's compute dtype and attention kernel (as the student)
    teacher_config = dataclasses.replace(saved_model_config(teacher_dir),
                                         dtype=config.model.dtype,
                                         attention_impl=config.model.attention_impl)
    check_vocabularies(teacher_dir, teacher_config, config.model, student_dir)
    if peft:
        from cadenza.train.peft.task import peft_task

        student = peft_task(dataclasses.replace(config, train=dataclasses.replace(
            config.train, task="lm", init_from=student_dir)))
    else:
        student = full_model_task(config.model, init_from=student_dir,
                                  init_field="train.distill.student")
    teacher = Transformer(teacher_config)

    def apply(trainable, frozen, batch, rng):
        return student.apply(trainable, frozen["student"], batch, rng)

    def loss(trainable, frozen, batch, rng):
        logits = apply(trainable, frozen, batch, rng)
        teacher_logits = teacher.apply({"params": frozen["teacher"]}, batch["inputs"],
                                       positions=batch["positions"],
                                       segment_ids=batch["segment_ids"])[0]
        total, count = distill_loss_sums(logits, teacher_logits, batch["loss_mask"],
                                         distill.loss)
        return total, total, count, acceptance_sums(logits, teacher_logits,
                                                    batch["loss_mask"])

    return dataclasses.replace(
        student,
        load_frozen=lambda mesh, rules: {
            "student": student.load_frozen(mesh, rules),
            "teacher": frozen_params(teacher_config, teacher_dir, mesh, rules)},
        abstract_frozen=lambda mesh, rules: {
            "student": student.abstract_frozen(mesh, rules),
            "teacher": abstract_frozen_params(teacher_config, mesh, rules)},
        apply=apply, loss=loss,
        export=lambda trainable, frozen: student.export(trainable, frozen["student"]),
        total_params=student.total_params + teacher_config.num_params())
