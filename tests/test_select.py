"""Instruction-data selection: scores against NumPy, determinism, a corrupted pool, the CLI."""

import json

import numpy as np
import pytest

from cadenza.cli import main
from cadenza.config import load_config
from cadenza.errors import ConfigError
from cadenza.train.data import stdlib
from cadenza.train.data.formatting import Formatter
from cadenza.train.data.pipeline import resolve_tokenizer
from cadenza.train.data.records import Problems
from cadenza.train.select import Scorer, SelectSpec, choose, kmeans, rank, select, tokenize

MODULES = ["textwrap.py", "bisect.py", "colorsys.py", "shlex.py", "fnmatch.py", "glob.py",
           "copy.py", "heapq.py", "calendar.py", "string.py"]
SEQ_LEN = 128


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A stdlib instruction pool whose second half has its bodies rotated onto the wrong
    docstrings, and a tiny model trained briefly on the clean pairs: ``(dir, overrides,
    clean flag per pool line, clean pairs)``."""
    from cadenza.train import fit

    tmp = tmp_path_factory.mktemp("select")
    root = stdlib.stdlib_root()
    pairs = [p[:2] for m in MODULES
             for p in stdlib.instruction_pairs((root / m).read_text(), m)
             if len(p[0]) + len(p[1]) < 320][:32]
    half = len(pairs) // 2
    bodies = [b for _, b in pairs[half:]]
    wrong = bodies[1:] + bodies[:1]
    lines = [{"instruction": i, "output": b} for i, b in pairs[:half]] + [
        {"instruction": i, "output": b} for (i, _), b in zip(pairs[half:], wrong)]
    (tmp / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp / "clean.jsonl").write_text("".join(
        json.dumps({"instruction": i, "output": b}) + "\n" for i, b in pairs))
    common = [f"data.data_dir={tmp / 'data'}", "data.format=alpaca",
              "data.stdlib_modules=[" + ",".join(MODULES) + "]", "data.heldout_fraction=0.0",
              f"train.seq_len={SEQ_LEN}"]
    fit(load_config(None, common + [
        f"data.path={tmp / 'clean.jsonl'}", f"train.output_dir={tmp / 'run'}",
        "train.steps=100", "train.learning_rate=1e-2", "train.warmup_steps=5",
        "train.tensorboard=false", "train.progress_bar=false", "train.log_every=100"],
        preset="tiny"))
    overrides = common + [f"data.path={tmp / 'pool.jsonl'}",
                          f"train.init_from={tmp / 'run' / 'model'}"]
    return tmp, overrides, np.arange(len(lines)) < half, pairs


def _line(record) -> int:
    return int(record["source"].rsplit(":", 1)[1]) - 1


@pytest.mark.parametrize("method", ["nll", "ifd"])
def test_corrupted_pairs_are_left_out(pool, method):
    _, overrides, clean, _ = pool
    result = select(load_config(None, overrides, preset="tiny"), SelectSpec(method, 0.4))
    kept = [_line(result["records"][i]) for i in result["selected"]]
    assert len(kept) == 13 and np.mean(clean[kept]) >= 0.9, (method, clean[kept])


def test_grape_keeps_the_likely_response_per_instruction(pool):
    tmp, overrides, _, pairs = pool
    # Every instruction twice: its own body and a neighbour's.
    lines = [{"instruction": i, "output": b} for k, (i, b) in enumerate(pairs)
             for b in (b, pairs[(k + 1) % len(pairs)][1])]
    (tmp / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    config = load_config(None, overrides + [f"data.path={tmp / 'two.jsonl'}"], preset="tiny")
    result = select(config, SelectSpec("grape", 1.0))
    kept = [_line(result["records"][i]) for i in result["selected"]]
    assert result["counts"]["instructions"] == len(kept) > 0.9 * len(pairs)  # some too long
    assert np.mean([k % 2 == 0 for k in kept]) >= 0.9  # the own body (even lines)


def test_scores_match_numpy_and_same_seed_same_selection(pool):
    _, overrides, _, pairs = pool
    config = load_config(None, overrides, preset="tiny")
    target = [{"messages": [{"role": "user", "content": i}, {"role": "assistant",
                                                             "content": b}],
               "text": "", "source": "t"} for i, b in pairs[:3]]
    result = select(config, SelectSpec("rds", 5), target=target)
    records = result["records"]
    tok = resolve_tokenizer(config)
    formatter = Formatter(tok, SEQ_LEN, config.model.vocab_size, "truncate", Problems("skip"))
    seqs, _ = tokenize(formatter, records, SEQ_LEN)
    # length: the trained tokens of each record (within seq_len positions).
    np.testing.assert_array_equal(result["details"]["response_tokens"],
                                  [sum(m[1:SEQ_LEN + 1]) for _, m in seqs])
    # nll and rds from a plain NumPy pass over the model's logits and hidden states of each
    # whole record (every token, instruction and response, one record at a time).
    import jax

    from cadenza.models import Transformer
    scorer = Scorer(config)
    params = jax.device_get(scorer.params)
    model = Transformer(config.model)

    def reference(seqs):  # every record whole, padded at the end (segment 0)
        width = max(len(ids) for ids, _ in seqs)
        tokens = np.asarray([ids + [0] * (width - len(ids)) for ids, _ in seqs], np.int32)
        real = np.arange(width)[None] < np.asarray([len(ids) for ids, _ in seqs])[:, None]
        logits, hidden, _ = model.apply({"params": params}, tokens,
                                        positions=np.broadcast_to(np.arange(width), real.shape),
                                        segment_ids=real.astype(np.int32))
        logits, hidden = np.asarray(logits, np.float64), np.asarray(hidden, np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        out = []
        for r, (ids, mask) in enumerate(seqs):
            m = np.asarray(mask[1:], np.float64)
            nll = -(logp[r, np.arange(len(ids) - 1), ids[1:]] * m).sum() / m.sum()
            w = np.arange(1, len(ids) + 1, dtype=np.float64)
            out.append((nll, (w / w.sum()) @ hidden[r, :len(ids)]))
        return out

    want = reference(seqs[:4])
    np.testing.assert_allclose(result["details"]["nll"][:4], [n for n, _ in want], rtol=1e-4)
    emb = np.stack([e for _, e in want])
    t_emb = np.stack([e for _, e in reference(tokenize(formatter, target, SEQ_LEN)[0])])
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(result["details"]["rds"][:4],
                               (unit(emb) @ unit(t_emb).T).max(-1),
                               rtol=1e-4)
    assert len(result["selected"]) == 5
    # rows of seq_len + 1 positions on a mesh that shards the sequence: padded, same scores.
    split = select(load_config(None, overrides + ["mesh.sequence=2"], preset="tiny"),
                   SelectSpec("rds", 5), target=target)
    np.testing.assert_allclose(split["details"]["rds"], result["details"]["rds"], atol=1e-5)
    # random: the seed decides, the same seed gives the same records.
    picks = [select(config, SelectSpec("random", 0.25, seed=s))["selected"].tolist()
             for s in (1, 1, 2)]
    assert picks[0] == picks[1] != picks[2] and len(picks[0]) == 8


def test_ranking_and_diversity():
    scores = np.asarray([3.0, 1.0, 2.0, 1.0, 5.0])
    eligible = np.asarray([True, True, True, True, False])
    assert rank("nll", scores, eligible).tolist() == [1, 3, 2, 0]      # lowest first, stable
    assert rank("length", scores, eligible).tolist() == [0, 2, 1, 3]   # longest first
    emb = np.asarray([[1, 0], [1, 0.01], [0, 1], [0, 1.01], [1, 0.02], [0.01, 1]], float)
    order = np.arange(6)
    deita = choose(SelectSpec("nll", 3, diversity="deita"), order, emb, 3)
    assert deita.tolist() == [0, 2]                  # near-copies of kept records are skipped
    assert sorted(np.bincount(kmeans(emb, 2, seed=0))) == [3, 3]
    km = choose(SelectSpec("nll", 4, diversity="kmeans", clusters=2), order, emb, 4)
    assert km.tolist() == [0, 1, 2, 3]               # two from each cluster, best first
    with pytest.raises(ConfigError, match="select.budget"):
        SelectSpec("nll", 2.5)
    assert SelectSpec("nll", 0.3).count(10) == 3 and SelectSpec("nll", 1).count(10) == 1


def test_cli_select_writes_a_dataset_and_every_score(pool, tmp_path, capsys):
    _, overrides, clean, _ = pool
    out = tmp_path / "sel"
    argv = ["data", "select", "tiny_pretrain", *overrides, "--method", "ifd", "--budget",
            "0.25", "--diversity", "kmeans", "--clusters", "2", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "scoring records: 32/32 records" in printed and "kept 8 of 32 records" in printed
    report = json.loads((out / "selection.json").read_text())
    assert report["method"] == "ifd" and report["counts"]["selected"] == 8
    scored = [r["ifd"] for r in report["records"] if r["ifd"] is not None]
    assert len(report["records"]) == 32 and all(x > 0 for x in scored)
    assert 32 - len(scored) == report["counts"]["unscorable"]  # no response within seq_len
    kept = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(kept) == 8 == sum(r["selected"] for r in report["records"])
    assert kept[0]["messages"][1]["role"] == "assistant"
    assert [p.name for p in tmp_path.iterdir()] == ["sel"]
    new = str(tmp_path / "new")
    bad = [(["--method", "ifd", "--budget", "2.5", "--out", new], "neither a record count"),
           (["--method", "best", "--budget", "3", "--out", new], "select.method"),
           (["--method", "nll", "--budget", "3", "train.init_from=null", "--out", new],
            "train.init_from"),
           (["--method", "length", "--budget", "3", "--out", str(out)], "already exists")]
    for extra, message in bad:
        assert main(["data", "select", "tiny_pretrain", *overrides, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
