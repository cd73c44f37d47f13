"""``cadenza ngram build`` and the file-corpus builder behind it."""

import json

import numpy as np

from cadenza.cli import main
from cadenza.decode import ngram_table


def _corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("abcabc\n")
    (root / "sub" / "b.txt").write_text("abd")
    (root / "sub" / "bin.dat").write_bytes(b"\xff\xfe")
    return root


def test_cli_byte_level_build(tmp_path, capsys):
    root = _corpus(tmp_path)
    assert main(["ngram", "build", "--input", str(root), "--byte-level", "--out",
                 str(tmp_path / "t"), "--max-order", "3"]) == 0
    assert "3 documents" in capsys.readouterr().out
    table = ngram_table.load_ngram_table(tmp_path / "t")
    m = table.manifest
    assert m["tokenizer"]["kind"] == "byte-level" and m["vocab_size"] == 259
    assert m["orders"] == [2, 3] and len(m["corpus"]["sources"]) == 3
    # BOS + bytes + EOS per file: 9 + 5 + 4 tokens.
    assert m["corpus"]["tokens"] == 18 and m["corpus"]["skipped_files"] == []
    a, b, c = (ord(ch) + ngram_table.BYTE_OFFSET for ch in "abc")
    counts = dict(zip(table.pair_keys.tolist(), table.pair_counts.tolist()))
    assert counts[ngram_table.pair_key([a], b)] == 3       # "ab" twice in a.txt, once in b.txt
    assert counts[ngram_table.pair_key([a, b], c)] == 2
    assert counts[ngram_table.pair_key([1], a)] == 2        # BOS then "a" in both text files


class _WordTokenizer:
    """A stand-in with the shared Tokenizer interface: one id per distinct character."""

    vocab_size, bos_id, eos_id, pad_id = 64, 1, 2, 0

    def encode(self, text, *, add_bos=True):
        return ([1] if add_bos else []) + [3 + ord(ch) % 60 for ch in text]


def test_tokenizer_build_skips_non_utf8_and_counts_it(tmp_path):
    root = _corpus(tmp_path)
    m = ngram_table.build_from_files([str(root)], tmp_path / "t", tokenizer=_WordTokenizer(),
                               tokenizer_id={"kind": "stand-in"}, max_order=2, add_eos=False,
                               doc_per_line=True)
    assert m["corpus"]["skipped_files"] == [str(root / "sub" / "bin.dat")]
    assert m["corpus"]["documents"] == 2 and m["tokenizer"] == {"kind": "stand-in"}
    assert m["corpus"]["tokens"] == 7 + 4
    table = ngram_table.load_ngram_table(tmp_path / "t")
    assert np.asarray(table.context_counts).sum() == m["corpus"]["ngrams_per_order"]["2"] == 9
    assert json.loads((tmp_path / "t" / "manifest.json").read_text()) == m


def test_cli_missing_input_is_a_user_error(tmp_path, capsys):
    code = main(["ngram", "build", "--input", str(tmp_path / "nope"), "--byte-level", "--out",
                 str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "nope" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "t").exists()
