"""``data.truncation=chunk``: long text documents become consecutive ``seq_len`` pieces that
pack with the rest, lose nothing, shard per host, mix, and resume exactly."""

import collections
import json

import numpy as np
import pytest

from cadenza.config import load_config
from cadenza.errors import ConfigError
from cadenza.models.tokenizer import train_tokenizer
from cadenza.train.data import build_iterator
from cadenza.train.data.formatting import Formatter, split_into_pieces
from cadenza.train.data.records import Problems

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
SEQ = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("chunk")
    rng = np.random.default_rng(0)
    # lengths from a few tokens to several rows, so most documents are cut into pieces
    docs = [f"doc {i}: " + " ".join(rng.choice(WORDS, size=rng.integers(1, 70)))
            for i in range(40)]
    (d / "long.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs) + "\n")
    (d / "short.jsonl").write_text("\n".join(json.dumps({"text": "zz " * (1 + i % 5)})
                                             for i in range(30)) + "\n")
    train_tokenizer(docs + ["zz zz"], 300, d / "tok")
    return d


def _config(files, *overrides, path="long.jsonl"):
    return load_config(None, [f"data.data_dir={files / 'prepared'}",
                              f"data.tokenizer={files / 'tok'}", "data.format=text",
                              f"data.path={files / path}", "data.heldout_fraction=0.2",
                              "data.truncation=chunk", f"train.seq_len={SEQ}",
                              "train.batch_size=4", *overrides], preset="tiny")


def _record(text="", messages=()):
    return {"messages": list(messages), "text": text, "source": "t.jsonl:1"}


def _segments(batches):
    """(inputs, targets, loss_mask) of every packed segment, plus per-segment checks."""
    out = []
    for b in batches:
        for row in range(len(b["inputs"])):
            seg = b["segment_ids"][row]
            assert np.all(b["loss_mask"][row][seg == 0] == 0)
            for s in range(1, seg.max() + 1):
                sel = seg == s
                assert b["positions"][row][sel].tolist() == list(range(sel.sum()))
                out.append(tuple(tuple(b[k][row][sel].tolist())
                                 for k in ("inputs", "targets", "loss_mask")))
    return out


def test_long_document_becomes_pieces_that_concatenate_to_it(files):
    from cadenza.models.tokenizer import load_tokenizer

    tok = load_tokenizer(files / "tok")
    # a document of 3.5 * seq_len tokens (BOS + text + EOS)
    text = next(t for k in range(1, 200)
                if len(tok.encode(t := "alpha beta " * k, add_bos=True)) % 7 == 6)
    ids = tok.encode(text, add_bos=True) + [tok.eos_id]
    seq_len = 2 * len(ids) // 7
    assert len(ids) == 3.5 * seq_len
    f = Formatter(tok, seq_len, 300, "chunk", Problems("stop"))
    example = f(_record(text))
    assert len(example["inputs"]) == len(ids) - 1  # whole: the pipeline cuts it
    pieces = split_into_pieces(example, seq_len)
    assert [len(p["inputs"]) for p in pieces] == [seq_len] * 3 + [seq_len // 2 - 1]
    inputs = np.concatenate([p["inputs"] for p in pieces])
    targets = np.concatenate([p["targets"] for p in pieces])
    assert inputs.tolist() + targets[-1:].tolist() == ids
    assert targets.tolist() == ids[1:]  # every token after BOS is a target exactly once
    assert [int(p["inputs"][0] == tok.bos_id) for p in pieces] == [1, 0, 0, 0]
    assert [int(tok.eos_id in p["targets"]) for p in pieces] == [0, 0, 0, 1]
    assert all(p["loss_mask"].all() for p in pieces)
    assert dict(f.counts) == {"examples": 1, "kept": 1, "pieces": 4, "chunked": 1,
                              "tokens": len(ids) - 1, "trained_tokens": len(ids) - 1}


def test_chat_records_are_never_chunked(files):
    from cadenza.models.tokenizer import load_tokenizer

    tok = load_tokenizer(files / "tok")
    chat = [{"role": "user", "content": "alpha " * 20}, {"role": "assistant", "content": "beta"}]
    f = Formatter(tok, 8, 300, "chunk", Problems("skip"))
    assert f(_record(messages=chat)) is None and f.problems.counts["too_long"] == 1
    assert len(Formatter(tok, 256, 300, "chunk", Problems("skip"))(
        _record(messages=chat))["inputs"]) <= 256
    with pytest.raises(ConfigError, match="truncation"):
        _config(files, "data.truncation=split")


def test_chunked_rows_pack_and_keep_every_token(files):
    # the held-out split is one pass in order: its segments are exactly the pieces
    config = _config(files, "data.heldout_fraction=0.5")
    it = build_iterator(config, split="test")
    batches = list(it)
    segments = _segments(batches)
    f = Formatter(it.tokenizer, SEQ, 300, "chunk", Problems("stop"))
    from cadenza.train.data.builders import open_split
    from cadenza.train.data.formatting import decode_record

    ds, _, _ = open_split(config.data.sources()[0], config.data, "test")
    expected = [tuple(tuple(p[k].tolist()) for k in ("inputs", "targets", "loss_mask"))
                for i in range(len(ds)) for p in split_into_pieces(f(decode_record(ds[i])), SEQ)]
    assert collections.Counter(segments) == collections.Counter(expected)
    stats = it.stats()
    assert stats["pieces"] == len(segments) > stats["kept"] == len(ds)
    assert stats["chunked"] > 0 and "truncated" not in stats and stats["skipped"] == {}
    filled = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert stats["tokens"] == stats["trained_tokens"] == filled
    # full pieces fill a row alone; short last pieces share rows (packed, not padded)
    rows = [b["segment_ids"][r] for b in batches for r in range(len(b["inputs"]))]
    assert any(r.max() == 1 and r.min() == 1 for r in rows)
    assert any(r.max() >= 2 for r in rows)
    # only pieces that start a document start with BOS
    bos = it.tokenizer.bos_id
    assert 0 < sum(s[0][0] == bos for s in segments) == len(ds) < len(segments)


def _mixture(files):
    return (f"data.mixture=[{{format: text, path: '{files / 'long.jsonl'}', weight: 0.7}},"
            f"{{format: text, path: '{files / 'short.jsonl'}', weight: 0.3}}]")


def _in_a_document(state) -> bool:
    """Whether a chunked stream in ``state`` has given pieces of its current document
    (a resume must re-read that document and skip exactly those)."""
    if isinstance(state, dict):
        if state.get("next_index_in_buffer", 0) > 0:
            return True
        return any(_in_a_document(v) for v in state.values())
    return isinstance(state, list) and any(_in_a_document(v) for v in state)


@pytest.mark.parametrize("hosts, window", [(1, 0), (2, 8)])
def test_resume_mid_document_reproduces_the_stream(files, hosts, window):
    config = _config(files, _mixture(files), "data.packing_method=best_fit",
                     f"data.shuffle_window={window}")
    it = build_iterator(config, process_index=hosts - 1, process_count=hosts)
    for _ in range(12):
        next(it)
        state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
        if _in_a_document(state):
            break
    assert _in_a_document(state)
    expected = [next(it) for _ in range(20)]  # crosses epoch boundaries (reshuffled)
    again = build_iterator(config, process_index=hosts - 1, process_count=hosts)
    again.set_state(state)
    got = [next(again) for _ in range(20)]
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(got, expected) for k in x)
    # both sources reach the batches
    text = [it.tokenizer.decode(s[0]) for s in _segments(expected)]
    assert any(t.startswith("zz") for t in text) and any(t.startswith("doc") for t in text)


def _continuations(files, window):
    """Unpacked rows (one piece each, in stream order) that continue the previous row's
    document, and all rows that do not start a document."""
    it = build_iterator(_config(files, "data.packing=false", f"data.shuffle_window={window}"))
    rows = [(b["inputs"][r], b["targets"][r][b["segment_ids"][r] > 0])
            for b in [next(it) for _ in range(8)] for r in range(4)]
    inner = [i for i in range(1, len(rows)) if rows[i][0][0] != it.tokenizer.bos_id]
    return sum(rows[i][0][0] == rows[i - 1][1][-1] for i in inner), len(inner)


def test_shuffle_window_spreads_a_documents_pieces(files):
    follows, inner = _continuations(files, 0)
    assert follows == inner > 5  # in order: every inner piece follows its predecessor
    follows, inner = _continuations(files, 64)
    assert follows < inner / 2


def test_hosts_read_disjoint_documents(files):
    config = _config(files, "data.shuffle=false")
    firsts = []
    for i in range(2):
        it = build_iterator(config, process_index=i, process_count=2)
        segs = _segments([next(it) for _ in range(4)])
        firsts.append({s[0] for s in segs if s[0][0] == it.tokenizer.bos_id})
    assert firsts[0] and firsts[1] and not firsts[0] & firsts[1]


def test_cli_inspect_shows_the_pieces(files, capsys):
    from cadenza.cli import main

    overrides = [f"data.data_dir={files / 'prepared'}", f"data.tokenizer={files / 'tok'}",
                 "data.format=text", f"data.path={files / 'long.jsonl'}",
                 "data.heldout_fraction=0.2", "data.truncation=chunk", f"train.seq_len={SEQ}",
                 "train.batch_size=4"]
    assert main(["data", "inspect", "tiny_pretrain", *overrides, "-n", "5", "--batches",
                 "2"]) == 0
    out = capsys.readouterr().out
    assert f"pieces of {SEQ}+{SEQ}+" in out
    counts = json.loads(out.split("counts: ")[1].splitlines()[0])
    assert counts["pieces"] > counts["kept"] > 0 and counts["chunked"] > 0
    assert " segments, " in out
