"""LUD data: unit marking, placeholder rows (METHODS 7.2), the packed mask (7.3), the task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.decode.lud_config import LudConfig
from cadenza.errors import CadenzaError, ConfigError
from cadenza.models import Transformer, init_params
from cadenza.train.lud_data import (
    RowIterator,
    build_rows,
    lud_attention_mask,
    make_windows,
    mark_units,
    token_confidences,
)
from cadenza.train.lud_task import lud_task, with_placeholder_embedding

PH = 511


def test_mark_units_finds_planted_runs():
    conf = np.full(30, 0.2)
    conf[3:6] = 0.95          # run of 3
    conf[10:19] = 0.99        # run of 9: chunks 4, 4, 1 (the last one gets no unit)
    conf[22] = 0.97           # a single confident token
    conf[25:27] = 0.9         # exactly alpha counts
    conf[0] = 1.0             # token 0 has no prediction: never confident
    run = mark_units(conf, alpha=0.9, max_unit=4, marking="run")
    assert run == [(3, 5), (10, 13), (14, 17), (25, 26)]
    head = mark_units(conf, alpha=0.9, max_unit=4, marking="head")
    assert head == [(2, 5), (9, 12), (13, 16), (17, 18), (21, 22), (24, 26)]
    assert mark_units(conf, alpha=0.99, max_unit=2) == [(10, 11), (12, 13), (14, 15),
                                                        (16, 17)]
    assert mark_units(conf, alpha=1.01, max_unit=4) == []
    first = np.array([0.0, 0.95, 0.95, 0.1])
    assert mark_units(first, alpha=0.9, max_unit=4, marking="head") == [(1, 2)]


def _row():
    window = np.arange(10, 23)[None]            # y_0..y_12, 12 real inputs
    units = [[(2, 4), (7, 8)]]                  # 2 + 1 placeholders
    return window, units


def test_rows_place_placeholders_after_the_predictor():
    window, units = _row()
    batch, stats = build_rows(window, units, seq_len=16, placeholder_id=PH,
                              placeholder_weight=0.5)
    y = window[0]
    # slots: y0 y1 P P y2 y3 y4 y5 y6 P y7 .. y11
    ph = [2, 3, 9]
    assert np.flatnonzero(batch["inputs"][0] == PH).tolist() == ph
    assert batch["targets"][0, ph].tolist() == [y[3], y[4], y[8]]
    assert batch["positions"][0, ph].tolist() == [2, 3, 7]          # pos(y_{a-1}) + j
    assert batch["lud_group"][0].tolist() == [0, 0, 1, 1] + [0] * 5 + [2] + [0] * 6
    real = [i for i in range(16) if i not in ph]
    assert batch["inputs"][0, real].tolist() == y[:12].tolist() + [0]
    assert batch["targets"][0, real[:12]].tolist() == y[1:13].tolist()
    assert batch["positions"][0, real[:12]].tolist() == list(range(12))
    assert batch["loss_mask"][0].tolist() == [1, 1, .5, .5, 1, 1, 1, 1, 1, .5] + [1] * 5 + [0]
    assert batch["segment_ids"][0].tolist() == [1] * 15 + [0]
    assert stats.as_dict() == {"rows": 1, "real_tokens": 12, "placeholders": 3, "units": 2,
                               "truncated_real_tokens": 0, "truncated_units": 0,
                               "pad_slots": 1}
    _, cut = build_rows(window, units, seq_len=9, placeholder_id=PH)
    assert cut.truncated_units == 1 and cut.truncated_real_tokens == 5
    assert (cut.real_tokens, cut.placeholders, cut.pad_slots) == (7, 2, 0)
    with pytest.raises(CadenzaError, match="pad id"):
        build_rows(window, units, seq_len=16, placeholder_id=0)


def test_mask_has_exactly_the_described_visibility():
    window, units = _row()
    batch, _ = build_rows(window, units, seq_len=16, placeholder_id=PH)
    mask = np.asarray(lud_attention_mask(jnp.asarray(batch["lud_group"])))[0]
    group = batch["lud_group"][0]
    for i in range(16):
        for j in range(16):
            if group[i] == 0:      # a real token sees exactly the real tokens up to itself
                want = j <= i and group[j] == 0
            else:                  # real tokens before its group + earlier own placeholders
                first = int(np.flatnonzero(group == group[i])[0])
                want = (group[j] == 0 and j < first) or (group[j] == group[i] and j <= i)
            assert mask[i, j] == want, (i, j)


def test_placeholders_leave_real_token_logits_unchanged(tiny_config):
    cfg = tiny_config("llama")
    params = init_params(cfg, jax.random.key(1))
    window, units = _row()
    batch, _ = build_rows(window, units, seq_len=16, placeholder_id=PH)
    model = Transformer(cfg)
    logits, _, _ = model.apply({"params": params}, jnp.asarray(batch["inputs"]),
                               positions=jnp.asarray(batch["positions"]),
                               segment_ids=jnp.asarray(batch["segment_ids"]),
                               attention_mask=lud_attention_mask(jnp.asarray(batch["lud_group"])))
    plain, _, _ = model.apply({"params": params}, jnp.asarray(window[:, :12]))
    real = np.flatnonzero((batch["lud_group"][0] == 0) & (batch["segment_ids"][0] == 1))
    np.testing.assert_allclose(np.asarray(logits)[0, real], np.asarray(plain)[0], atol=1e-5)
    # and the placeholders do predict something else than their neighbours
    assert not np.allclose(np.asarray(logits)[0, 2], np.asarray(logits)[0, 1], atol=1e-3)


def test_confidences_are_teacher_forced_probabilities(tiny_config):
    cfg = tiny_config("llama")
    params = init_params(cfg, jax.random.key(2))
    tokens = np.random.default_rng(0).integers(3, 259, size=200)
    windows = make_windows(tokens, 15)
    assert windows.shape == (13, 16) and (windows[1, 0] == tokens[15])
    conf = token_confidences(cfg, params, windows, batch_size=4)
    logits, _, _ = Transformer(cfg).apply({"params": params}, jnp.asarray(windows[:, :-1]))
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    want = np.take_along_axis(probs, windows[:, 1:, None], axis=-1)[..., 0]
    assert conf.shape == windows.shape and (conf[:, 0] == 0).all()
    np.testing.assert_allclose(conf[:, 1:], want, rtol=1e-5, atol=1e-7)


def test_row_iterator_cycles_and_resumes():
    rows = {"inputs": np.arange(5)[:, None] * np.ones((1, 3), np.int32)}
    it = RowIterator(rows, batch_size=2, seed=3)
    seen = [next(it)["inputs"][:, 0].tolist() for _ in range(3)]
    assert sorted(seen[0] + seen[1] + seen[2][:1]) == [0, 1, 2, 3, 4]
    state = it.get_state()
    after = next(it)["inputs"]
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["inputs"], after)


def test_placeholder_row_starts_at_the_mean_embedding(tiny_config):
    cfg = tiny_config("llama")
    params = init_params(cfg, jax.random.key(3))
    new = with_placeholder_embedding(params, PH)
    table = np.asarray(params["embed"]["embedding"])
    want = np.delete(table, PH, axis=0).mean(axis=0)
    np.testing.assert_allclose(np.asarray(new["embed"]["embedding"])[PH], want, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new["embed"]["embedding"])[:PH], table[:PH])
    assert lud_task(cfg, params, LudConfig()).trainable_params == cfg.num_params()
    for bad in (0, 2, 512):
        with pytest.raises(ConfigError, match="placeholder"):
            LudConfig(placeholder_id=bad).placeholder_for(cfg)
    with pytest.raises(ConfigError, match="lud.marking"):
        LudConfig(marking="span")


def test_finetune_needs_a_base_model():
    from cadenza.config import load_config
    from cadenza.train.lud_task import finetune_lud

    with pytest.raises(ConfigError, match="base model"):
        finetune_lud(load_config(None, [], preset="tiny"))
