"""The stdlib datasets: code corpus and instruction pairs, deterministic, held-out by module;
the default tokenizer; ``cadenza data inspect``."""

import ast
import collections
import dataclasses

import pytest

from cadenza.cli import main
from cadenza.config import load_config
from cadenza.train.data import build_iterator
from cadenza.train.data.builders import build, open_split
from cadenza.train.data.formatting import decode_record
from cadenza.train.data.records import Problems
from cadenza.train.data.stdlib import INSTRUCTION, stdlib_files, stdlib_records

MODULES = ["textwrap.py", "bisect.py", "heapq.py", "fnmatch.py", "glob.py", "json/", "shlex.py",
           "colorsys.py"]


def _overrides(tmp, fmt="stdlib_instruct"):
    return [f"data.data_dir={tmp}", f"data.format={fmt}", "data.heldout_fraction=0.3",
            "data.stdlib_modules=[" + ",".join(MODULES) + "]", "train.seq_len=256",
            "train.batch_size=2"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stdlib")
    return tmp, load_config(None, _overrides(tmp), preset="tiny")


def test_module_selection():
    files = [str(f) for f in stdlib_files(MODULES)]
    assert files == sorted(files) and "json/decoder.py" in files and "textwrap.py" in files
    assert not any("test" in f.parts[:-1] for f in stdlib_files())


def test_instruction_pairs_are_valid_python():
    counts = collections.Counter()
    records = [r for _, r in stdlib_records("instruct", MODULES, Problems("stop"), counts)]
    assert len(records) > 30 and counts["read"] == len(records)
    for r in records:
        user, assistant = (m["content"] for m in r["messages"])
        assert user.startswith(INSTRUCTION)
        header = ast.parse(user[len(INSTRUCTION):]).body[0]
        assert isinstance(header, (ast.FunctionDef, ast.AsyncFunctionDef))
        assert ast.get_docstring(header) is not None and len(header.body) == 1
        ast.parse(assistant)  # the body is code on its own


def test_build_is_deterministic_with_a_module_level_heldout_split(prepared, tmp_path):
    tmp, config = prepared
    source = config.data.sources()[0]
    report = build(source, config.data)
    again = build(source, config.data, tmp_path, rebuild=True)
    assert report["splits"] == again["splits"] and report["written"] == again["written"]
    modules = {}
    for split in ("train", "test"):
        ds, _, _ = open_split(source, config.data, split)
        records = [decode_record(ds[i]) for i in range(len(ds))]
        modules[split] = {r["source"].rsplit(":", 1)[0] for r in records}
        other, _, _ = open_split(source, dataclasses.replace(config.data,
                                                             data_dir=str(tmp_path)), split)
        assert [decode_record(other[i]) for i in range(len(other))] == records
    assert modules["train"] and modules["test"] and not modules["train"] & modules["test"]


def test_default_tokenizer_and_iterators(prepared):
    tmp, config = prepared
    it = build_iterator(config)
    tok = it.tokenizer
    assert tok.vocab_size == config.model.vocab_size == 512
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (config.model.pad_token_id,
                                                     config.model.bos_token_id,
                                                     config.model.eos_token_id)
    b = next(it)
    assert 0 < b["loss_mask"].sum() < (b["segment_ids"] > 0).sum()  # prompts are masked
    code = build_iterator(load_config(None, _overrides(tmp, "stdlib_code"), preset="tiny"))
    b = next(code)
    assert b["loss_mask"].sum() == (b["segment_ids"] > 0).sum()  # pretraining: all trained


def test_cli_inspect_marks_masked_tokens(prepared, capsys):
    tmp, _ = prepared
    assert main(["data", "inspect", "tiny_pretrain", *_overrides(tmp), "-n", "1",
                 "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "\u27e6<s><|user|>\nWrite the body of this Python function." in out
    assert "</s>\u27e6" in out  # the reply and its EOS are trained, what follows is not
    assert "positions filled" in out and '"trained_tokens"' in out
