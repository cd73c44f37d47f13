"""The grain pipeline: packing (and the model never attending across segments), exact
resume, per-host shares, deterministic shuffling, mixtures, catalog datasets."""

import json

import jax
import numpy as np
import pytest

from cadenza.config import load_config
from cadenza.errors import CadenzaError, ConfigError
from cadenza.models import Transformer, init_params
from cadenza.models.tokenizer import train_tokenizer
from cadenza.train.data import build_iterator
from cadenza.train.data.builders import build
from cadenza.train.data_config import DataSource

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    docs = [f"doc {i}: " + " ".join(rng.choice(WORDS, size=rng.integers(1, 8)))
            for i in range(60)]
    (d / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs) + "\n")
    (d / "b.jsonl").write_text("\n".join(json.dumps({"text": "zz " * (1 + i % 5)})
                                         for i in range(30)) + "\n")
    (d / "chat.jsonl").write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]})
        for w in WORDS) + "\n")
    train_tokenizer(docs + ["zz zz", "say"], 300, d / "tok")
    return d


def _config(files, *overrides):
    return load_config(None, [f"data.data_dir={files / 'prepared'}",
                              f"data.tokenizer={files / 'tok'}", "data.format=text",
                              f"data.path={files / 'a.jsonl'}", "data.heldout_fraction=0.2",
                              "train.seq_len=32", "train.batch_size=4", *overrides],
                       preset="tiny")


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("method", ["first_fit", "best_fit"])
def test_packed_batches_are_well_formed(files, method):
    it = build_iterator(_config(files, f"data.packing_method={method}"))
    for b in _take(it, 3):
        assert set(b) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
        assert all(v.shape == (4, 32) for v in b.values())
        assert b["loss_mask"].dtype == np.float32 and b["inputs"].dtype == np.int32
        seg, pos = b["segment_ids"], b["positions"]
        assert np.all(b["loss_mask"][seg == 0] == 0)
        assert seg.max() >= 2  # short documents really are packed
        for row in range(4):
            for s in range(1, seg[row].max() + 1):
                p = pos[row][seg[row] == s]
                assert p.tolist() == list(range(len(p)))  # positions restart per segment
                assert b["inputs"][row][seg[row] == s][0] == 1  # each starts with one BOS


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_packed_logits_equal_unpacked(files, tiny_config, family):
    b = next(build_iterator(_config(files)))
    cfg = tiny_config(family, "model.dtype=float32")
    model = Transformer(cfg)
    params = init_params(cfg, jax.random.key(0))
    packed, _, _ = jax.jit(lambda p, t, s, q: model.apply(
        {"params": p}, t, segment_ids=s, positions=q))(
        params, b["inputs"], b["segment_ids"], b["positions"])
    one = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
    seg = b["segment_ids"][0]
    assert seg.max() >= 2  # later segments would see earlier ones if attention leaked
    for s in range(1, seg.max() + 1):
        sel = seg == s
        # alone, right-padded to the row length (causal: padding after it changes nothing)
        alone = np.zeros((1, seg.size), np.int32)
        alone[0, :sel.sum()] = b["inputs"][0][sel]
        logits = np.asarray(one(params, alone))[0, :sel.sum()]
        np.testing.assert_allclose(np.asarray(packed[0][sel]), logits, atol=1e-5)


def test_unpacked_rows_are_padded(files):
    b = next(build_iterator(_config(files, "data.packing=false")))
    assert np.all(b["segment_ids"].max(axis=1) == 1)
    assert np.all(b["inputs"][b["segment_ids"] == 0] == 0)


def test_exact_resume(files):
    config = _config(files, "data.packing_method=best_fit")
    it = build_iterator(config)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
    expected = _take(it, 25)  # crosses an epoch boundary (reshuffled)
    again = build_iterator(config)
    again.set_state(state)
    assert _same(_take(again, 25), expected)


def test_shuffle_is_deterministic_by_seed(files):
    a = _take(build_iterator(_config(files)), 2)
    assert _same(a, _take(build_iterator(_config(files)), 2))
    assert not _same(a, _take(build_iterator(_config(files, "data.seed=1")), 2))


def _documents(it, n):
    """The tokens of every segment in ``n`` batches."""
    out = []
    for b in _take(it, n):
        for row in range(len(b["inputs"])):
            for s in range(1, b["segment_ids"][row].max() + 1):
                out.append(tuple(b["inputs"][row][b["segment_ids"][row] == s]))
    return out


def test_two_hosts_read_disjoint_halves(files):
    config = _config(files, "data.shuffle=false")
    hosts = [build_iterator(config, process_index=i, process_count=2) for i in range(2)]
    for it in hosts:
        assert next(it)["inputs"].shape == (2, 32)  # batch_size // process_count rows
    hosts = [build_iterator(config, process_index=i, process_count=2) for i in range(2)]
    docs = [set(_documents(it, 6)) for it in hosts]
    everything = set(_documents(build_iterator(config), 12))
    assert docs[0] and docs[1] and not docs[0] & docs[1]
    assert docs[0] | docs[1] <= everything
    with pytest.raises(ConfigError, match="divisible"):
        build_iterator(_config(files, "train.batch_size=3"), process_count=2)


def test_shard_by_files_needs_enough_files(files):
    with pytest.raises(CadenzaError, match="1 file\\(s\\) but there are 2 hosts"):
        build_iterator(_config(files, "data.shard_by=files"), process_count=2)
    config = _config(files, "data.shard_by=files", "data.num_shards=2", "data.shuffle=false")
    docs = [set(_documents(build_iterator(config, process_index=i, process_count=2), 4))
            for i in range(2)]
    assert docs[0] and docs[1] and not docs[0] & docs[1]


def test_mixture_follows_weights(files):
    mix = (f"data.mixture=[{{format: text, path: '{files / 'a.jsonl'}', weight: 0.25}},"
           f"{{format: text, path: '{files / 'b.jsonl'}', weight: 0.75}}]")
    it = build_iterator(_config(files, mix, "data.packing=false", "train.batch_size=8"))
    rows = [row for b in _take(it, 10) for row in b["inputs"]]
    share_b = np.mean([it.tokenizer.decode(row).startswith("zz") for row in rows])
    assert abs(share_b - 0.75) < 0.1


def test_catalog_dataset_by_name_and_chat(files):
    out = files / "catalog"
    report = build(DataSource("messages", str(files / "chat.jsonl")),
                   _config(files).data, out)
    assert report["written"] == len(WORDS)
    config = _config(files, "data.format=tfds", "data.name=local_files/messages",
                     f"data.data_dir={out}", "data.packing=false", "data.heldout_fraction=0.0")
    b = next(build_iterator(config))
    tok = build_iterator(config).tokenizer
    for row in range(4):
        trained = b["targets"][row][b["loss_mask"][row] == 1]
        assert tok.decode(trained, skip_special_tokens=False) in {f"{w}</s>" for w in WORDS}
    with pytest.raises(CadenzaError, match="cannot open"):
        build_iterator(_config(files, "data.format=tfds", "data.name=nope", f"data.data_dir={out}"))


def test_bad_examples_while_loading(files):
    # ids beyond a smaller model vocab: skipped and counted (not silently trained on)
    it = build_iterator(_config(files, "model.vocab_size=295"))
    next(it)
    assert it.stats()["skipped"]["token_out_of_vocab"] > 0
    assert it.stats()["kept"] > 0
    with pytest.raises(CadenzaError, match="token_out_of_vocab") as e:
        next(build_iterator(_config(files, "model.vocab_size=295", "data.on_error=stop")))
    assert "a.jsonl:" in e.value.where
    # nothing usable at all: a clear error instead of an endless search
    with pytest.raises(CadenzaError, match="no usable example"):
        next(build_iterator(_config(files, "model.vocab_size=100")))


def test_test_split_is_one_padded_pass(files):
    it = build_iterator(_config(files), split="test")
    batches = list(it)
    assert batches and all(b["inputs"].shape == (4, 32) for b in batches)
