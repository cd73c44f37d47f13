"""Formatting: assistant-only loss masks, one BOS, trained EOS, vocab checks, truncation,
NEFTune."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.errors import CadenzaError
from cadenza.models.tokenizer import train_tokenizer
from cadenza.train.data.formatting import Formatter
from cadenza.train.data.neftune import neftune_noise
from cadenza.train.data.records import Problems

CONV = [{"role": "system", "content": "You answer in code."},
        {"role": "user", "content": "Sum two numbers."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        {"role": "user", "content": "Now subtract."},
        {"role": "assistant", "content": "def sub(a, b):\n    return a - b"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["def add(a, b):\n    return a + b\n", "Sum two numbers. Now subtract."] * 20
    return train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))


def _record(messages=(), text=""):
    return {"messages": list(messages), "text": text, "source": "test.jsonl:1"}


def _formatter(tok, seq_len=256, vocab=512, truncation="truncate", on_error="skip"):
    return Formatter(tok, seq_len, vocab, truncation, Problems(on_error))


def test_chat_mask_trains_every_assistant_turn_and_its_eos(tok):
    ex = _formatter(tok)(_record(CONV))
    inputs, targets, mask = ex["inputs"], ex["targets"], ex["loss_mask"]
    tokens = np.concatenate([inputs[:1], targets])
    assert tokens[0] == tok.bos_id and list(tokens).count(tok.bos_id) == 1
    trained = targets[mask == 1]
    # the trained tokens are exactly the two replies, each followed by EOS
    text = tok.decode(trained, skip_special_tokens=False)
    assert text == f"{CONV[2]['content']}</s>{CONV[4]['content']}</s>"
    eos_positions = np.flatnonzero(targets == tok.eos_id)
    # EOS ends every turn (system, user, assistant...): only the assistant ones are trained
    assert len(eos_positions) == 5 and list(mask[eos_positions]) == [0, 0, 1, 0, 1]
    untrained = tok.decode(targets[mask == 0], skip_special_tokens=False)
    for m in CONV[:2] + CONV[3:4]:
        assert m["content"] in untrained
    assert "<|assistant|>" in untrained  # the generation prompt is context, not a target


def test_text_records_get_bos_text_eos_all_trained(tok):
    ex = _formatter(tok)(_record(text="x = 1\n"))
    tokens = np.concatenate([ex["inputs"][:1], ex["targets"]])
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    assert tok.decode(tokens[1:-1]) == "x = 1\n"
    assert ex["loss_mask"].tolist() == [1.0] * len(ex["targets"])
    assert ex["inputs"].dtype == np.int32 and ex["loss_mask"].dtype == np.float32


def test_bad_examples_are_reported(tok):
    f = _formatter(tok, vocab=200)  # the tokenizer's merges reach ids >= 200
    assert f(_record(text="def add(a, b):\n    return a + b\n")) is None
    assert f.problems.counts["token_out_of_vocab"] == 1
    f = _formatter(tok)
    assert f(_record(text="one <s> two")) is None and f.problems.counts["extra_bos"] == 1
    with pytest.raises(CadenzaError, match="token_out_of_vocab") as e:
        _formatter(tok, vocab=200, on_error="stop")(_record(text="def add(a, b): return"))
    assert e.value.where == "test.jsonl:1"
    f = _formatter(tok)
    assert f(_record([{"role": "robot", "content": "x"}, CONV[2]])) is None
    assert f.problems.counts["template_error"] == 1


def test_truncation_policy_is_applied_and_counted(tok):
    long = _record(text="return a + b\n" * 40)
    f = _formatter(tok, seq_len=16)
    ex = f(long)
    assert len(ex["inputs"]) == 16 and f.counts["truncated"] == 1
    assert f.counts["truncated_tokens"] > 0
    f = _formatter(tok, seq_len=16, truncation="drop")
    assert f(long) is None and f.problems.counts["too_long"] == 1
    # a reply cut off entirely leaves nothing to train: skipped and counted
    f = _formatter(tok, seq_len=8)
    assert f(_record(CONV)) is None and f.problems.counts["no_trained_tokens"] == 1


def test_neftune_noise_scales_by_each_segment_length():
    emb = jnp.ones((2, 6, 8), jnp.float32)
    seg = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 2, 2, 2, 2]])
    key = jax.random.key(0)
    assert neftune_noise(emb, seg, key, 0.0) is emb
    out = neftune_noise(emb, seg, key, 5.0)
    assert out.dtype == emb.dtype and out.shape == emb.shape
    delta = np.asarray(out) - 1.0
    seg_len = np.array([[4, 4, 4, 4, 1, 1], [2, 2, 4, 4, 4, 4]])
    bound = 5.0 / np.sqrt(seg_len * 8)
    assert np.all(np.abs(delta) <= bound[..., None] + 1e-6)
    assert np.all(delta[0, 4:] == 0)  # no noise on padding
    # each segment's noise really reaches its own scale (not the row's)
    assert np.abs(delta[1, :2]).max() > 5.0 / np.sqrt(4 * 8)
    assert np.abs(delta[1, 2:]).max() > bound[1, 2] / 2
    assert not np.array_equal(out, neftune_noise(emb, seg, jax.random.key(1), 5.0))


def test_neftune_applies_in_training_steps_only(tiny_config):
    from cadenza.models import init_params
    from cadenza.train.task import full_model_task

    cfg = tiny_config("gemma")
    params = init_params(cfg, jax.random.key(0))
    batch = {"inputs": jnp.arange(3, 11, dtype=jnp.int32)[None],
             "positions": jnp.arange(8, dtype=jnp.int32)[None],
             "segment_ids": jnp.ones((1, 8), jnp.int32)}
    clean = full_model_task(cfg).apply(params, {}, batch, jax.random.key(1))
    noisy_task = full_model_task(cfg, neftune_alpha=5.0)
    np.testing.assert_array_equal(noisy_task.apply(params, {}, batch, None), clean)
    assert float(jnp.abs(noisy_task.apply(params, {}, batch, jax.random.key(1)) - clean).max()) > 0
