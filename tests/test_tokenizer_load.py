"""Tokenizer loading (tokenizer.json and SentencePiece), BOS policy, round trips, training."""

import json

import pytest

from cadenza.errors import CadenzaError
from cadenza.models.tokenizer import TRAINED_SPECIAL_TOKENS, load_tokenizer, train_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "Grüße, 世界! tabs\tand  spaces  \n",
         "class Foo:\n    pass\n"] * 10
SAMPLES = ["x = 1\n", "  leading and trailing  ", "Grüße 😀 世界\n\n", ""]


def test_trained_tokenizer_ids_round_trip_and_bos(tmp_path):
    tok = train_tokenizer(TEXTS, 300, tmp_path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 300
    assert [tok.token_to_id(t) for t in TRAINED_SPECIAL_TOKENS] == list(range(6))
    for s in SAMPLES:
        ids = tok.encode(s)
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
        assert tok.decode(ids) == s
        assert tok.decode(tok.encode(s, add_bos=False)) == s
    assert tok.encode("<s>abc") == tok.encode("abc")  # BOS never doubled
    assert tok.encode("abc", add_bos=False)[0] != tok.bos_id
    ids = tok.encode("<|user|>\nhi</s>", add_bos=False)
    assert ids[0] == 4 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=False) == "<|user|>\nhi</s>"
    again = train_tokenizer(TEXTS, 300, tmp_path / "again")
    assert [again.encode(s) for s in SAMPLES] == [tok.encode(s) for s in SAMPLES]  # deterministic
    assert tok.chat_template and load_tokenizer(tmp_path).chat_template == tok.chat_template


def test_offsets_cover_the_text(tmp_path):
    tok = train_tokenizer(TEXTS, 300, tmp_path)
    text = "<s>Grüße</s> 世界"
    ids, offsets = tok.encode_with_offsets(text)
    # byte-level pieces of one character share its span; together they cover every character
    assert {i for a, b in offsets for i in range(a, b)} == set(range(len(text)))
    assert all(a0 <= a1 for (a0, _), (a1, _) in zip(offsets, offsets[1:]))
    assert len(ids) == len(offsets)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 3))
    spm.SentencePieceTrainer.Train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=320,
        model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
        byte_fallback=True, add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        user_defined_symbols=["<start_of_turn>"], minloglevel=2)
    return d


def test_sentencepiece_model(sp_dir):
    tok = load_tokenizer(sp_dir)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.bos_token == "<s>" and tok.vocab_size == 320
    for s in SAMPLES[:3]:
        ids = tok.encode(s)
        assert ids[0] == 1 and ids.count(1) == 1
        assert tok.decode(ids) == s
    # a control token written as text becomes its id, and is not doubled as BOS
    ids = tok.encode("<s>x = 1</s>")
    assert ids[0] == 1 and ids.count(1) == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=False) == "<s>x = 1</s>"
    ids, offsets = tok.encode_with_offsets("<start_of_turn>Grüße</s>", add_bos=False)
    assert ids[0] == tok.token_to_id("<start_of_turn>") and offsets[0] == (0, 15)
    assert offsets[-1] == (20, 24)


def test_sentencepiece_special_tokens_from_config(sp_dir, tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
         "pad_token": None, "chat_template": "{{ bos_token }}"}))
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<start_of_turn>"}))
    tok = load_tokenizer(d)
    assert tok.eos_token == "<start_of_turn>" and tok.pad_id is None
    assert tok.chat_template == "{{ bos_token }}"


def test_bad_tokenizer_dirs(tmp_path):
    with pytest.raises(CadenzaError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(CadenzaError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CadenzaError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path)
    train_tokenizer(TEXTS, 300, tmp_path)
    (tmp_path / "special_tokens_map.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(CadenzaError, match="not in the vocabulary"):
        load_tokenizer(tmp_path)
    with pytest.raises(CadenzaError, match="too small"):
        train_tokenizer(TEXTS, 100, tmp_path / "small")
