"""Bad inputs are one clear error (exit 2, no traceback) and nothing is written or lost:
merge-lora into the wrong model, duplicate YAML keys, output paths that exist, files that
are not what they claim to be."""

import dataclasses
import hashlib

import jax
import pytest

from cadenza.cli import main
from cadenza.config import load_config
from cadenza.models import init_params, save_model
from cadenza.outputs import MARKER
from cadenza.train import peft
from cadenza.train.peft.artifacts import save_adapters


def _hashes(d):
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _error(capsys, argv, *fragments):
    """Run the CLI: exit 2, no traceback, and one ``error:`` line (the last on stderr, after
    any progress lines) holding every fragment."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    err = lines[-1]
    assert err.startswith("error: ") and "Traceback" not in "\n".join(lines), lines
    assert sum(ln.startswith("error:") for ln in lines) == 1, lines
    for f in fragments:
        assert f in err, err
    return err


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    """A tiny base, a LoRA adapter recorded as trained on it, a copy of the base and a model
    of another architecture (vocab 256, MLP 128)."""
    root = tmp_path_factory.mktemp("merge")
    cfg = load_config(None, ["peft.method=lora", "peft.rank=4",
                             f"train.init_from={root / 'base'}"], preset="tiny")
    base_cfg = dataclasses.replace(cfg, peft=type(cfg.peft)())
    params = init_params(cfg.model, jax.random.key(0))
    save_model(root / "base", base_cfg, params)
    save_model(root / "copy", base_cfg, params)
    _, trainable, _ = peft.prepare(cfg, params, jax.random.key(1))
    save_adapters(root / "ad", cfg, trainable)
    other = load_config(None, ["model.vocab_size=256", "model.intermediate_size=128"],
                        preset="tiny")
    save_model(root / "other", other, init_params(other.model, jax.random.key(2)))
    return root


def test_merge_lora_refuses_another_architecture_and_another_base(lora_dirs, capsys):
    root = lora_dirs
    _error(capsys, ["convert", "merge-lora", "--model", str(root / "other"), "--adapter",
                    str(root / "ad"), "--out", str(root / "m1")],
           "another model architecture", "model.vocab_size: adapters have 512, --model has 256",
           "model.intermediate_size")
    _error(capsys, ["convert", "merge-lora", "--model", str(root / "copy"), "--adapter",
                    str(root / "ad"), "--out", str(root / "m2")],
           f"trained on the base {root / 'base'}", "--allow-other-base")
    assert not (root / "m1").exists() and not (root / "m2").exists()
    assert main(["convert", "merge-lora", "--model", str(root / "copy"), "--adapter",
                 str(root / "ad"), "--out", str(root / "m3"), "--allow-other-base"]) == 0
    assert (root / "m3" / MARKER).is_file()
    # an existing output is never overwritten
    before = _hashes(root / "m3")
    _error(capsys, ["convert", "merge-lora", "--model", str(root / "base"), "--adapter",
                    str(root / "ad"), "--out", str(root / "m3")], "already exists")
    assert _hashes(root / "m3") == before


def test_duplicate_yaml_keys_are_an_error(tmp_path, capsys):
    f = tmp_path / "exp.yaml"
    f.write_text("model:\n  preset: tiny\ntrain:\n  steps: 3\nmodel:\n  num_layers: 1\n")
    _error(capsys, ["config", "show", str(f)], f"{f}:5", "key 'model' appears twice",
           "lines 1 and 5")
    f.write_text("train:\n  steps: 3\n  seed: 1\n  steps: 4\n")
    _error(capsys, ["config", "show", str(f)], "key 'steps' appears twice")


def test_non_utf8_files_name_the_line(tmp_path, capsys):
    f = tmp_path / "exp.yaml"
    f.write_bytes(b"train:\n  steps: 3 # caf\xe9\n")
    _error(capsys, ["config", "show", str(f)], f"{f}:2", "not UTF-8", "0xe9")


def test_seq_len_above_max_position_embeddings(capsys, tmp_path):
    """Refused before training compiles (a config that is never trained, e.g. an imported
    model's, may carry any train.seq_len)."""
    _error(capsys, ["train", "tiny_pretrain", "train.seq_len=2048",
                    f"train.output_dir={tmp_path / 'run'}"],
           "train.seq_len=2048 is longer than the model's max_position_embeddings=1024")


def test_jsonl_whose_first_line_is_an_array_keeps_the_other_records(tmp_path):
    import collections
    import json

    from cadenza.train.data.records import Problems, read_records

    rows = [json.dumps([{"instruction": "a", "output": "b"}])] + [
        json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(40)]
    f = tmp_path / "part-1.jsonl"
    f.write_text("\n".join(rows) + "\n")
    problems, counts = Problems("skip"), collections.Counter()
    records = list(read_records("alpaca", [f], problems, counts))
    assert len(records) == 40 and counts["read"] == 41 and problems.skipped == 1
    assert records[0]["source"] == f"{f}:2"


def test_data_build_out_naming_a_file(tmp_path, capsys):
    data = tmp_path / "a.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    _error(capsys, ["data", "build", "--format", "alpaca", "--input", str(data), "--out",
                    str(out)], "--out names an existing file")
    assert out.read_text() == "keep me"


def test_pickled_npy_in_an_ngram_table_is_refused_without_unpickling(tmp_path):
    import numpy as np

    from cadenza.decode.ngram_table import build_ngram_table, load_ngram_table
    from cadenza.errors import CadenzaError

    table = tmp_path / "table"
    build_ngram_table([[1, 2, 3, 4, 1, 2, 3]], table, vocab_size=8, max_order=3)
    np.save(table / "pair_counts.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CadenzaError, match="pair_counts.npy: holds pickled Python objects"):
        load_ngram_table(table)


@pytest.mark.parametrize("source, message", [
    ("{{ 'x' * 10**9 }}", "'*' would build a value of 1000000000 items"),
    ("{% for i in range(10**8) %}{% endfor %}", "Range too big"),
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
     "took longer than 0.3 s"),
    ("{% set s = 'x' * 50000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
     "took longer than"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "maximum recursion depth"),
])
def test_chat_templates_have_time_and_size_limits(source, message, monkeypatch):
    from cadenza.errors import CadenzaError
    from cadenza.models import chat_template

    monkeypatch.setattr(chat_template, "MAX_SECONDS", 0.3)
    with pytest.raises(CadenzaError, match="correct the template") as e:
        chat_template.ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    assert message in str(e.value) and "roles, order" not in str(e.value)


def test_sandbox_escape_is_not_blamed_on_the_conversation():
    from cadenza.errors import CadenzaError
    from cadenza.models.chat_template import ChatTemplate

    with pytest.raises(CadenzaError, match="sandbox forbids.*__class__") as e:
        ChatTemplate("{{ ''.__class__.__mro__ }}").render([{"role": "user", "content": "x"}])
    assert "roles, order" not in str(e.value) and "published template" in str(e.value)


def test_non_utf8_prompts_file(lora_dirs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"hello\nna\xefve\n")
    _error(capsys, ["generate", "--checkpoint", str(lora_dirs / "base"), "--prompts-file",
                    str(prompts)], f"{prompts}:2", "not UTF-8")


def _hf_dir(tmp_path, name="hf"):
    from cadenza.models import save_hf

    cfg = load_config(None, [], preset="tiny")
    return save_hf((cfg.model, init_params(cfg.model, jax.random.key(0))), tmp_path / name)


def _rewrite(path, edit):
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(path))
    edit(arrays)
    save_file(arrays, str(path), metadata={"format": "pt"})


def test_nan_weights_are_refused_at_import_and_float64_casts_are_counted(tmp_path, capsys):
    import numpy as np

    hf = _hf_dir(tmp_path)
    assert (hf / MARKER).is_file()
    weights = hf / "model.safetensors"

    def poison(a):
        a["model.norm.weight"][3] = np.nan

    _rewrite(weights, poison)
    _error(capsys, ["convert", "hf-import", str(hf), str(tmp_path / "out")],
           "tensor model.norm.weight holds 1 NaN/inf value", "model.safetensors")
    assert not (tmp_path / "out").exists()

    def float64(a):
        a["model.norm.weight"] = np.ones(a["model.norm.weight"].shape, np.float64)
        a["lm_head.weight"] = a["lm_head.weight"].astype(np.float64)

    _rewrite(weights, float64)
    capsys.readouterr()
    assert main(["convert", "hf-import", str(hf), str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "cast to float32: 2 F64 tensors (float64 loses precision)" in captured.out + captured.err


def test_hf_export_is_atomic_and_never_overwrites(lora_dirs, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["convert", "hf-export", str(lora_dirs / "base"), str(out)]) == 0
    before = _hashes(out)
    assert MARKER in before and not list(tmp_path.glob(".hf.partial*"))
    _error(capsys, ["convert", "hf-export", str(lora_dirs / "base"), str(out)], "already exists")
    assert _hashes(out) == before


def test_disk_full_and_read_only_are_one_line_errors(lora_dirs, tmp_path, monkeypatch):
    import errno

    import orbax.checkpoint as ocp
    import safetensors.numpy

    from cadenza.errors import CadenzaError

    cfg = load_config(None, [], preset="tiny")
    params = init_params(cfg.model, jax.random.key(0))
    for code, text in ((errno.ENOSPC, "the disk is full"),
                       (errno.EROFS, "the file system is read-only")):
        def fail(*a, code=code, **k):
            raise OSError(code, "simulated", "params")

        def fail_safetensors(*a, code=code, **k):  # how the library reports an OS error
            raise safetensors.SafetensorError(f"Error while serializing: I/O error: "
                                              f"simulated (os error {code})")

        monkeypatch.setattr(ocp.StandardCheckpointer, "save", fail)
        monkeypatch.setattr(safetensors.numpy, "save_file", fail_safetensors)
        for params_format in ("safetensors", "orbax"):
            with pytest.raises(CadenzaError, match=text):
                save_model(tmp_path / "m", cfg, params, params_format=params_format)
            assert not list(tmp_path.iterdir())  # no partial directory left behind


def test_peft_import_accepts_peft_s_lm_head_base_copy(lora_dirs, tmp_path, capsys):
    import numpy as np

    from cadenza.models import load_model
    from cadenza.train.peft.artifacts import peft_export

    cfg = load_config(None, ["peft.method=lora", "peft.rank=2", "peft.targets=lm_head|q_proj"],
                      preset="tiny")
    _, params = load_model(lora_dirs / "base")
    pm, trainable, _ = peft.prepare(cfg, params, jax.random.key(1))
    hf = tmp_path / "hf_ad"
    peft_export(hf, pm, trainable)
    head = np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"], np.float32).T)

    def add_base(a, value=head):
        a["base_model.model.lm_head.base_layer.weight"] = value  # what peft's save adds

    _rewrite(hf / "adapter_model.safetensors", add_base)
    assert main(["convert", "peft-import", "--model", str(lora_dirs / "base"), "--hf-adapter",
                 str(hf), "--out", str(tmp_path / "ad")]) == 0
    _rewrite(hf / "adapter_model.safetensors", lambda a: add_base(a, head + 1.0))
    _error(capsys, ["convert", "peft-import", "--model", str(lora_dirs / "base"), "--hf-adapter",
                    str(hf), "--out", str(tmp_path / "ad2")],
           "lm_head.base_layer.weight (the base weight peft saved with the adapter) differs")


def _data(tmp_path, path, data_dir, fraction):
    return load_config(None, ["data.format=alpaca", f"data.path={path}",
                              f"data.data_dir={tmp_path / data_dir}",
                              f"data.heldout_fraction={fraction}"], preset="tiny").data


def test_held_out_split_does_not_depend_on_path_spelling_and_missing_split_is_clear(
        tmp_path, monkeypatch):
    import json

    from cadenza.errors import CadenzaError
    from cadenza.train.data import builders

    (tmp_path / "d").mkdir()
    f = tmp_path / "d" / "a.jsonl"
    f.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n"
                         for i in range(24)))
    held_out = []
    for spelling, where in ((str(f), "one"), (f"{tmp_path}/d/../d/./a.jsonl", "two")):
        data = _data(tmp_path, spelling, where, 0.3)
        ds, _, _ = builders.open_split(data.sources()[0], data, "test")
        held_out.append(sorted(str(ds[i]["messages"]) for i in range(len(ds))))
    assert held_out[0] == held_out[1] and 0 < len(held_out[0]) < 24
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    data = _data(tmp_path, one, "three", 0.05)
    report = builders.build(data.sources()[0], data)
    missing = ({"train", "test"} - set(report["splits"])).pop()  # one record: one split
    with pytest.raises(CadenzaError, match=f"has no '{missing}' split: its 1 records gave "
                                           "none to it .*train.eval_every=0"):
        builders.open_split(data.sources()[0], data, missing)


def test_ngram_table_rebuild_is_atomic(tmp_path, capsys, monkeypatch):
    from cadenza.decode import ngram_table

    corpus = tmp_path / "c.txt"
    corpus.write_text("abcabcabd\n")
    out = tmp_path / "table"
    argv = ["ngram", "build", "--input", str(corpus), "--byte-level", "--out", str(out)]
    assert main(argv) == 0
    before = _hashes(out)

    def crash(*a, **k):
        raise OSError(28, "No space left on device", "pair_keys.npy")

    monkeypatch.setattr(ngram_table.np, "save", crash)
    _error(capsys, argv, "the disk is full")
    assert _hashes(out) == before and not list(tmp_path.glob(".table.partial*"))


# What transformers 5.23's LlamaTokenizer gives for a folder holding only this
# tokenizer.model (recorded; the reference env has no protobuf to load it there). Text
# that starts with a space is left out: cadenza keeps sentencepiece's "▁▁" there.
SP_TEXTS = {
    "Hello world": ["▁Hello", "▁world"],
    "Hello<start_of_turn>user": ["▁Hello", "<start_of_turn>", "us", "er"],
    "<start_of_turn>user": ["<start_of_turn>", "us", "er"],
    "a <s> b": ["▁a", "▁", "<s>", "▁", "<0x62>"],
    "x</s>y": ["▁", "x", "</s>", "<0x79>"],
    "<s>Hi there": ["<s>", "Hi", "▁there"],
    "Hi\n<end_of_turn>\nthere": ["▁Hi", "<0x0A>", "<end_of_turn>", "<0x0A>", "th", "ere"],
}


def test_sentencepiece_dummy_prefix_around_special_tokens_matches_transformers(tmp_path):
    import sentencepiece as spm

    from cadenza.models.tokenizer import load_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["Hello world, this is a test.", "Hi there friend",
                                 "user model turn text"] * 50))
    (tmp_path / "tok").mkdir()
    spm.SentencePieceTrainer.Train(
        input=str(corpus), model_prefix=str(tmp_path / "tok" / "tokenizer"), vocab_size=340,
        model_type="bpe", byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False)
    tok = load_tokenizer(tmp_path / "tok")
    for text, pieces in SP_TEXTS.items():
        ids, offsets = tok.encode_with_offsets(text, add_bos=False)
        assert [tok.id_to_token(i) for i in ids] == pieces, text
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert offsets[-1][1] == len(text) and offsets[0][0] == 0


def test_cli_turns_a_read_only_output_into_one_line(tmp_path, capsys, monkeypatch):
    import errno
    import pathlib

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "x"))

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    f = tmp_path / "a.jsonl"
    f.write_text('{"instruction": "q", "output": "a"}\n')
    _error(capsys, ["data", "build", "--format", "alpaca", "--input", str(f), "--out",
                    str(tmp_path / "new" / "d")], "the file system is read-only")
