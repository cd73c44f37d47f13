"""Draft distillation (``train.task: distill``): the loss is 0 when student = teacher and its
gradient matches finite differences; ``cadenza train tiny_distill`` writes a model directory
that drafts for ``cadenza generate --method speculative`` (greedy == plain greedy); a
vocabulary or tokenizer mismatch is refused before anything compiles."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.cli import main
from cadenza.config import load_config
from cadenza.decode import DecodeConfig, generate
from cadenza.errors import ConfigError
from cadenza.models import Transformer, init_params, save_model
from cadenza.train.config import DISTILL_LOSSES
from cadenza.train.distill_task import (
    check_vocabularies,
    distill_divergence,
    distill_loss_sums,
)

PROMPTS = [[1, 17, 42, 99, 5], [1, 300], [1, 7, 7, 7, 200, 201, 202, 31, 64]]
STEPS = 15
SMALL = ["model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=64"]


@pytest.mark.parametrize("kind", DISTILL_LOSSES)
def test_loss_is_zero_iff_student_equals_teacher(kind):
    logits = jax.random.normal(jax.random.key(0), (2, 3, 11)) * 3.0
    other = jax.random.normal(jax.random.key(1), (2, 3, 11)) * 3.0
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    total, count = distill_loss_sums(logits, logits, mask, kind)
    assert count == 4 and abs(float(total)) < 1e-5
    # a constant shift of the logits is the same distribution
    assert abs(float(distill_loss_sums(logits + 5.0, logits, mask, kind)[0])) < 1e-5
    div = distill_divergence(other, logits, kind)
    assert div.shape == (2, 3) and bool(jnp.all(div > 1e-3))
    total, _ = distill_loss_sums(other, logits, mask, kind)
    np.testing.assert_allclose(float(total), float(jnp.sum(div * mask)), rtol=1e-6)


def test_forward_kl_ignores_tokens_the_teacher_rules_out():
    teacher = jnp.array([[0.0, 1.0, -jnp.inf]])
    student = jnp.array([[0.5, 0.2, 0.1]])
    value, grad = jax.value_and_grad(
        lambda s: distill_divergence(s, teacher, "forward_kl").sum())(student)
    assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad)))


def test_tv_matches_a_numpy_reference():
    s, t = (np.random.default_rng(i).normal(size=(4, 7)) for i in (0, 1))
    p, q = (np.exp(x) / np.exp(x).sum(-1, keepdims=True) for x in (t, s))
    np.testing.assert_allclose(distill_divergence(s, t, "tv"), 0.5 * np.abs(p - q).sum(-1),
                               rtol=1e-5)
    np.testing.assert_allclose(distill_divergence(s, t, "forward_kl"),
                               (p * np.log(p / q)).sum(-1), rtol=1e-4)
    np.testing.assert_allclose(distill_divergence(s, t, "reverse_kl"),
                               (q * np.log(q / p)).sum(-1), rtol=1e-4)


@pytest.mark.parametrize("kind", DISTILL_LOSSES)
def test_gradient_matches_finite_differences(kind):
    rng = np.random.default_rng(2)
    student = rng.normal(size=(2, 2, 5)).astype(np.float32)
    teacher = rng.normal(size=(2, 2, 5)).astype(np.float32)
    mask = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)

    def f(s):
        return distill_loss_sums(s, teacher, mask, kind)[0]

    grad = np.asarray(jax.grad(f)(jnp.asarray(student)))
    eps = 1e-2
    numeric = np.zeros_like(student)
    for idx in np.ndindex(student.shape):
        up, down = student.copy(), student.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (float(f(up)) - float(f(down))) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=2e-3)
    assert np.all(grad[0, 1] == 0)          # an uncounted position has no gradient
    # the teacher gets no gradient
    g_teacher = jax.grad(lambda t: distill_loss_sums(student, t, mask, kind)[0])(teacher)
    assert not np.any(np.asarray(g_teacher))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    config = load_config(None, [], preset="tiny")
    params = init_params(config.model, jax.random.key(0))
    params = {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * 40.0}}
    return tmp, save_model(tmp / "teacher", config, params), config, params


def train(tmp, teacher, name, *extra):
    argv = ["train", "tiny_distill", f"train.init_from={teacher}",
            f"train.output_dir={tmp / name}", "train.steps=3", "train.batch_size=8",
            "train.seq_len=32", "train.log_every=1", "train.warmup_steps=1",
            "train.checkpoint_every=0", "train.tensorboard=false", "train.progress_bar=false",
            f"data.data_dir={tmp / 'data'}", "data.stdlib_modules=[bisect.py,colorsys.py]",
            *extra]
    return main(argv)


def test_distilled_model_drafts_for_speculative_decoding(models, capsys):
    tmp, tdir, tconfig, tparams = models
    assert train(tmp, tdir, "run") == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n"):])     # after the dataset builder's notes
    assert summary["step"] == 3 and summary["adapters_dir"] is None
    assert summary["model_dir"] == str(tmp / "run" / "model")
    losses = [json.loads(x)["loss"] for x in (tmp / "run" / "metrics.jsonl").read_text()
              .splitlines()]
    assert len(losses) == 3 and all(x > 0 for x in losses) and losses[-1] < losses[0]
    saved = load_config(tmp / "run" / "model" / "config.yaml").model
    assert (saved.num_layers, saved.hidden_size) == (1, 32)
    argv = ["generate", "--checkpoint", str(tdir), "--json", "--max-new-tokens", "12",
            "--ignore-eos", "--method", "speculative", "--draft", summary["model_dir"],
            "--gamma", "3"]
    for p in PROMPTS:
        argv += ["--prompt-ids", ",".join(map(str, p))]
    assert main(argv) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    plain = generate(Transformer(tconfig.model), tparams, PROMPTS,
                     DecodeConfig(max_new_tokens=12, ignore_eos=True))
    assert [r["token_ids"] for r in rows] == plain.token_ids


def test_vocabulary_mismatch_is_refused_before_compiling(models, capsys):
    tmp, tdir, _, _ = models
    config = load_config(None, SMALL + ["model.vocab_size=384"], preset="tiny")
    student = save_model(tmp / "student384", config,
                         init_params(config.model, jax.random.key(1)))
    assert train(tmp, tdir, "bad", f"train.distill.student={student}",
                 "model.vocab_size=384") == 2
    err = capsys.readouterr().err
    assert "train.distill.student" in err and "384" in err and "512" in err
    assert "Traceback" not in err and not (tmp / "bad" / "checkpoints").exists()
    # a student saved for another model section: the field is named
    assert train(tmp, tdir, "bad2", f"train.distill.student={tdir}") == 2
    assert "train.distill.student holds a different model" in capsys.readouterr().err


def test_tokenizer_mismatch_names_both_fingerprints(models, tmp_path):
    _, _, tconfig, _ = models
    dirs = []
    for name in ("teacher", "student"):
        tok = tmp_path / f"tok_{name}"
        tok.mkdir()
        (tok / "tokenizer.json").write_text(json.dumps({"name": name}))
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer").symlink_to(tok)
        dirs.append(tmp_path / name)
    with pytest.raises(ConfigError, match="tokenizer.*sha256.*differs.*sha256"):
        check_vocabularies(dirs[0], tconfig.model, tconfig.model, dirs[1])
    check_vocabularies(dirs[0], tconfig.model, tconfig.model, dirs[0])   # same: fine


def test_distilled_draft_agrees_more_than_an_lm_pretrained_one(tmp_path):
    """Same student, data, steps and optimizer: trained on a bigram teacher's distributions
    (its layers' output projections zeroed) a draft accepts more (mean 1 - TV) and agrees
    with the teacher's greedy choice more often than trained on the data tokens."""
    import dataclasses

    from cadenza.config import ExperimentConfig
    from cadenza.models import load_model
    from cadenza.train.config import TrainConfig
    from cadenza.train.head_fit import TokenBatches
    from cadenza.train.trainer import fit

    tconfig = load_config(None, [], preset="tiny")
    tparams = init_params(tconfig.model, jax.random.key(3))
    layers = tparams["layers"]
    layers["attn"]["o_proj"]["kernel"] = jnp.zeros_like(layers["attn"]["o_proj"]["kernel"])
    layers["mlp"]["down_proj"]["kernel"] = jnp.zeros_like(layers["mlp"]["down_proj"]["kernel"])
    tparams["lm_head"]["kernel"] = tparams["lm_head"]["kernel"] * 8.0
    tdir = save_model(tmp_path / "bigram", tconfig, tparams)
    student = load_config(None, SMALL, preset="tiny").model
    tokens = np.random.default_rng(0).integers(3, 35, size=(STEPS + 1, 8, 17), dtype=np.int32)
    base = TrainConfig(steps=STEPS, batch_size=8, seq_len=16, learning_rate=1e-2,
                       warmup_steps=1, min_lr_ratio=0.0, log_every=STEPS,
                       async_checkpoints=False, tensorboard=False, progress_bar=False)
    held_out = jnp.asarray(tokens[-1, :, :-1])
    teacher_logits = Transformer(tconfig.model).apply({"params": tparams}, held_out)[0]
    scores = {}
    for task in ("lm", "distill"):
        train = dataclasses.replace(base, task=task, output_dir=str(tmp_path / task),
                                    init_from=str(tdir) if task == "distill" else None)
        summary = fit(ExperimentConfig(model=student, train=train),
                      data=TokenBatches(iter(tokens[:-1])), devices=jax.devices()[:1])
        logits = Transformer(student).apply(
            {"params": load_model(summary["model_dir"])[1]}, held_out)[0]
        accept = 1.0 - float(jnp.mean(distill_divergence(logits, teacher_logits, "tv")))
        agree = float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)))
        scores[task] = (accept, agree)
    assert scores["distill"][0] > scores["lm"][0] + 0.05, scores
    assert scores["distill"][1] > scores["lm"][1], scores


def test_on_policy_distillation_trains_on_cached_teacher_generations(models, capsys):
    """``on_policy``: the teacher's generations are made once (cached under the run's output
    dir, keyed by a fingerprint), only continuations count, and every step logs the draft's
    acceptance (mean 1 - TV) and top-1 agreement."""
    from cadenza.train.data import build_iterator
    from cadenza.train.distill_data import on_policy_iterator

    tmp, tdir, _, _ = models
    extra = ["train.distill.on_policy=true", "train.distill.prompts=4",
             "train.distill.prompt_len=6", "train.distill.new_tokens=8",
             "train.distill.gen_batch=4", "train.distill.temperature=0"]
    assert train(tmp, tdir, "on_policy", *extra) == 0
    assert "on-policy data: 4 teacher generations" in capsys.readouterr().out
    cached = list((tmp / "on_policy" / "on_policy").glob("*.npz"))
    assert len(cached) == 1
    records = [json.loads(x) for x in (tmp / "on_policy" / "metrics.jsonl").read_text()
               .splitlines()]
    assert all(0.0 <= r["acceptance"] <= 1.0 and 0.0 <= r["top1_agreement"] <= 1.0
               for r in records)
    # each row counts its continuation's targets only: 8 per generation (greedy, no EOS cut)
    with np.load(cached[0]) as z:
        continuation = z["lengths"] - z["prompt_lengths"]
    assert records[0]["tokens"] == float(continuation.sum()) * 2    # 8 rows: the 4 twice
    config = load_config("tiny_distill", [f"train.init_from={tdir}",
                                          f"train.output_dir={tmp / 'on_policy'}",
                                          "train.batch_size=8", "train.seq_len=32",
                                          f"data.data_dir={tmp / 'data'}",
                                          "data.stdlib_modules=[bisect.py,colorsys.py]", *extra])
    batches = on_policy_iterator(config, build_iterator(config))     # the same prompts
    assert "reused from" in capsys.readouterr().out
    batch = next(batches)
    assert batch["inputs"].shape == (8, 32) and batch["loss_mask"].sum() == continuation.sum() * 2
    with pytest.raises(ConfigError, match="train.distill.new_tokens"):
        load_config("tiny_distill", ["train.seq_len=8", *extra])


def test_lora_on_a_saved_student(models, capsys):
    """``peft.method=lora``: only the saved student's adapters train; the exported draft has
    them merged; without a saved student the run is refused before compiling."""
    tmp, tdir, _, _ = models
    config = load_config("tiny_distill")
    student = save_model(tmp / "student_lora", config,
                         init_params(config.model, jax.random.key(4)))
    assert train(tmp, tdir, "lora", f"train.distill.student={student}", "peft.method=lora") == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n"):])
    assert summary["adapters_dir"] and summary["model_dir"]
    record = json.loads((tmp / "lora" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= record["acceptance"] <= 1.0
    assert train(tmp, tdir, "lora_bad", "peft.method=lora") == 2
    assert "train.distill.student" in capsys.readouterr().err
