"""The preference data format: records, pair examples (both sides trained only on their
response), packed pair rows, bad records counted, ``cadenza data inspect`` showing both
sides."""

import numpy as np
import pytest

from cadenza.config import load_config
from cadenza.errors import CadenzaError, ConfigError
from cadenza.train.data import build_iterator
from cadenza.train.data.formatting import Formatter, pair_budget
from cadenza.train.data.records import Problems, read_records


def test_records_parse_and_bad_ones_are_counted(pref_files):
    problems, counts = Problems("skip"), __import__("collections").Counter()
    records = list(read_records("preference", [pref_files / "pairs.jsonl"], problems, counts))
    assert len(records) == 24 and counts["read"] == 27
    assert dict(problems.counts) == {"identical_pair": 1, "missing_field": 1,
                                     "malformed_json": 1}
    assert records[1]["messages"] == [{"role": "user", "content": "say beta"}]
    assert records[1]["chosen"] == [{"role": "assistant", "content": "beta"}]
    with pytest.raises(CadenzaError, match="identical_pair"):
        list(read_records("preference", [pref_files / "pairs.jsonl"], Problems("stop"),
                          counts))


def test_pair_example_trains_only_each_response(pref_files):
    from cadenza.models.tokenizer import load_tokenizer

    tok = load_tokenizer(pref_files / "tok")
    f = Formatter(tok, 64, 512, "truncate", Problems("stop"))
    record = {**next(read_records("preference", [pref_files / "pairs.jsonl"], Problems(),
                                  __import__("collections").Counter())), "source": "r0"}
    ex = f(record)
    side = ex["pair_side"]
    for s, name in ((1, "chosen"), (2, "rejected")):
        ids, mask = f.side_tokens_and_mask(record, name)
        np.testing.assert_array_equal(ex["inputs"][side == s], ids[:-1])
        np.testing.assert_array_equal(ex["loss_mask"][side == s], np.float32(mask[1:]))
        # the earlier assistant turn ("hello") of the prompt is context, never trained
        trained = tok.decode([t for t, m in zip(ids, mask) if m])
        assert "hello" not in trained and trained.strip()
        np.testing.assert_array_equal(ex["pair_positions"][side == s], np.arange(len(ids) - 1))
    assert pair_budget(10, 100, 64) == (10, 54) and pair_budget(100, 5, 64) == (59, 5)
    assert pair_budget(100, 100, 64) == (32, 32)
    short = Formatter(tok, 12, 512, "drop", Problems("skip"))
    assert short(record) is None and short.problems.counts["too_long"] == 1


def test_packed_rows_hold_whole_pairs(pref_files, pref_config):
    it = build_iterator(pref_config())
    for b in [next(it) for _ in range(3)]:
        assert set(b) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
        seg = b["segment_ids"]
        for row in range(seg.shape[0]):
            ids = [s for s in np.unique(seg[row]) if s > 0]
            assert ids == list(range(1, len(ids) + 1)) and len(ids) % 2 == 0
            for s in ids:   # every side restarts at position 0, trains some tokens
                pos = b["positions"][row][seg[row] == s]
                np.testing.assert_array_equal(pos, np.arange(len(pos)))
                assert b["loss_mask"][row][seg[row] == s].sum() > 0
    unpacked = next(build_iterator(pref_config("data.packing=false")))
    assert set(np.unique(unpacked["segment_ids"])) == {0, 1, 2}


def test_inspect_shows_both_sides_and_mixing_is_refused(pref_files, pref_config):
    from cadenza.train.data.inspect import inspect_data

    out = inspect_data(pref_config(), examples=2, batches=1)
    assert "[chosen]" in out and "[rejected]" in out and "preference pair of" in out
    with pytest.raises(ConfigError, match="mixes preference"):
        load_config(None, ["data.mixture=[{format: preference, path: a, weight: 0.5}, "
                           "{format: text, path: b, weight: 0.5}]"])
