"""Reading local formats into records, bad input reported with file:line, builds and the CLI."""

import collections
import json
import os

import pytest

from cadenza.cli import main
from cadenza.config import load_config
from cadenza.errors import CadenzaError, ConfigError
from cadenza.train.data.builders import source_location
from cadenza.train.data.records import Problems, read_records
from cadenza.train.data_config import DataConfig, DataSource


def _read(fmt, path, on_error="skip"):
    problems, counts = Problems(on_error), collections.Counter()
    return list(read_records(fmt, [path], problems, counts)), problems, counts


def _jsonl(path, rows):
    path.write_bytes(b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode()
                                for r in rows) + b"\n")
    return path


def test_formats_become_canonical_messages(tmp_path):
    alpaca = _jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add", "input": "1 2", "output": "3", "system": "Be brief."},
        {"instruction": "Hi", "output": "Hello"}])
    recs, problems, counts = _read("alpaca", alpaca)
    assert recs[0]["messages"] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Add\n\n1 2"},
                                   {"role": "assistant", "content": "3"}]
    assert recs[1]["source"] == f"{alpaca}:2" and counts["read"] == 2 and not problems.skipped
    array = tmp_path / "a.json"
    array.write_text('[\n {"instruction": "A", "output": "B"},\n\n {"instruction": "C",'
                     ' "output": "D"}\n]')
    recs, _, _ = _read("alpaca", array)
    assert [r["source"] for r in recs] == [f"{array}:2", f"{array}:4"]
    share = _jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "U"},
        {"from": "gpt", "value": "A"}, {"from": "human", "value": "U2"},
        {"from": "gpt", "value": "A2"}]}])
    recs, _, _ = _read("sharegpt", share)
    assert [m["role"] for m in recs[0]["messages"]] == ["system", "user", "assistant", "user",
                                                       "assistant"]
    msgs = _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                       {"role": "assistant", "content": "a"}]}])
    assert _read("messages", msgs)[0][0]["messages"][1] == {"role": "assistant", "content": "a"}
    doc = tmp_path / "doc.txt"
    doc.write_text("plain text\n")
    assert _read("text", doc)[0][0]["text"] == "plain text\n"
    texts = _jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two"}])
    assert [r["text"] for r in _read("text", texts)[0]] == ["one", "two"]


BAD_ROWS = [
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    b"{not json",
    b"\xff\xfe{}",
    {"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": "only a question"}]},
    {"messages": "nope"},
    {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
]
REASONS = ["malformed_json", "not_utf8", "unknown_role", "no_assistant_turn", "missing_field"]


def test_bad_records_are_counted_with_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    recs, problems, counts = _read("messages", path)
    assert len(recs) == 2 and counts["read"] == 7
    assert dict(problems.counts) == dict.fromkeys(REASONS, 1)
    where = {r: problems.examples[r][0].split(": ")[0] for r in REASONS}
    assert where == {"malformed_json": f"{path}:2", "not_utf8": f"{path}:3",
                     "unknown_role": f"{path}:4", "no_assistant_turn": f"{path}:5",
                     "missing_field": f"{path}:6"}


@pytest.mark.parametrize("line,reason", [(2, "malformed_json"), (3, "not_utf8"),
                                         (4, "unknown_role"), (5, "no_assistant_turn")])
def test_stop_policy_raises_at_the_bad_line(tmp_path, line, reason):
    path = _jsonl(tmp_path / "bad.jsonl", [BAD_ROWS[0], BAD_ROWS[line - 1]])
    with pytest.raises(CadenzaError, match=reason) as e:
        _read("messages", path, on_error="stop")
    assert e.value.where == f"{path}:2"


def test_cli_direct_build_prints_counts(tmp_path, capsys):
    path = _jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    out = tmp_path / "out"
    assert main(["data", "build", "--format", "messages", "--input", str(path),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "read 7, written 2" in text and "skipped 5" in text
    for reason in REASONS:
        assert f'"{reason}": 1' in text
    assert main(["data", "build", "--format", "messages", "--input", str(path), "--out",
                 str(tmp_path / "out2"), "--on-error", "stop"]) == 2
    assert f"{path}:2: malformed_json" in capsys.readouterr().err


def test_empty_results_always_stop(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["data", "build", "--format", "alpaca", "--input", str(empty),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no usable records" in capsys.readouterr().err
    allbad = _jsonl(tmp_path / "allbad.jsonl", [BAD_ROWS[1], BAD_ROWS[4]])
    assert main(["data", "build", "--format", "messages", "--input", str(allbad),
                 "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "no usable records" in err and "malformed_json" in err
    assert main(["data", "build", "--format", "text", "--input", str(tmp_path / "none*.txt"),
                 "--out", str(tmp_path / "o3")]) == 2
    assert "no input files" in capsys.readouterr().err


def test_config_errors():
    with pytest.raises(ConfigError, match="sum to 0.9"):
        load_config(None, ["data.mixture=[{format: stdlib_code, weight: 0.5},"
                           "{format: stdlib_instruct, weight: 0.4}]"])
    with pytest.raises(ConfigError, match="no path"):
        load_config(None, ["data.format=alpaca"])
    with pytest.raises(ConfigError, match="name of a prepared dataset"):
        load_config(None, ["data.format=tfds"])


def test_a_same_size_same_mtime_rewrite_is_not_the_old_build(tmp_path):
    """Local inputs are keyed by content: an edit keeping size and mtime moves the build."""
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "abc"}\n')
    st = path.stat()
    data = DataConfig(format="text", path=str(path), data_dir=str(tmp_path / "d"))
    source = DataSource(format="text", path=str(path))
    before = source_location(source, data)
    assert source_location(source, data) == before          # unchanged input: same build
    path.write_text('{"text": "abd"}\n')
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert source_location(source, data) != before
