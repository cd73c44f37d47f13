"""Parquet files, Arrow files and Hugging Face ``datasets`` folders (save_to_disk layout)
as data input: the same formats, records, skip counters and masks as JSONL."""

import collections
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cadenza.cli import main
from cadenza.errors import CadenzaError
from cadenza.train.data.records import Problems, expand_paths, read_records

ROWS = [{"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": None, "input": "", "output": "x"},  # bad: instruction not a string
        {"instruction": "Add 1 and 2.", "input": "", "output": "3"}]


def _save_to_disk(directory, rows):
    """The layout ``datasets.Dataset.save_to_disk`` writes: arrow stream files listed in
    state.json, plus dataset_info.json."""
    directory.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(directory / "data-00000-of-00001.arrow", table.schema) as w:
        w.write_table(table)
    (directory / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "train"}))
    (directory / "dataset_info.json").write_text("{}")
    return directory


def _read(path):
    problems, counts = Problems("skip"), collections.Counter()
    records = list(read_records("alpaca", expand_paths(str(path)), problems, counts))
    return records, problems, counts


@pytest.mark.parametrize("kind", ["parquet", "datasets", "dataset_dict"])
def test_tables_give_the_same_records_and_counts_as_jsonl(tmp_path, kind):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    if kind == "parquet":
        path = tmp_path / "a.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif kind == "datasets":
        path = _save_to_disk(tmp_path / "ds", ROWS)
    else:
        path = tmp_path / "dd"
        _save_to_disk(path / "train", ROWS)
        _save_to_disk(path / "test", ROWS[:1])
        (path / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    ours, problems, counts = _read(path)
    want, want_problems, want_counts = _read(jsonl)
    strip = [{k: v for k, v in r.items() if k != "source"} for r in want]
    assert [{k: v for k, v in r.items() if k != "source"} for r in ours] == strip
    assert counts == want_counts and problems.counts == want_problems.counts == {
        "missing_field": 1}
    assert ours[0]["source"].endswith(":1")


def test_bad_tables_and_folders(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    _, problems, counts = _read(tmp_path / "broken.parquet")
    assert problems.counts == {"unreadable_table": 1} and counts["read"] == 1
    dd = tmp_path / "dd"
    _save_to_disk(dd / "validation", ROWS)
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["validation"]}))
    with pytest.raises(CadenzaError, match="no train split.*dd/validation"):
        expand_paths(str(dd))


def test_data_build_from_a_datasets_folder(tmp_path, capsys):
    path = _save_to_disk(tmp_path / "ds", ROWS)
    assert main(["data", "build", "--format", "alpaca", "--input", str(path),
                 "--out", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (report["read"], report["written"], report["skipped"]) == (3, 2, {"missing_field": 1})


def test_data_paths_may_be_urls(fake_gcs, tmp_path):
    """gs:// inputs (and globs) are read through etils.epath like local files."""
    local = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), local)
    fake_gcs.pipe("bucket/data/a.parquet", local.read_bytes())
    fake_gcs.pipe("bucket/data/b.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    files = expand_paths("gs://bucket/data")
    assert [str(f) for f in files] == ["gs://bucket/data/a.parquet", "gs://bucket/data/b.jsonl"]
    assert [str(f) for f in expand_paths("gs://bucket/data/*.jsonl")] == [
        "gs://bucket/data/b.jsonl"]
    records, problems, counts = _read("gs://bucket/data")
    assert len(records) == 4 and counts["read"] == 6 and problems.counts == {"missing_field": 2}
    assert records[0]["source"] == "gs://bucket/data/a.parquet:1"
