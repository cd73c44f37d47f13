"""A shortened quickstart (``fast=True``: tiny models, a few steps) end to end on 8 fake CPU
devices: every artefact lands under the output dir and the table is honest."""

import json

from cadenza.quickstart import DECODE_METHODS, run_quickstart


def test_fast_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    results = run_quickstart(out_dir=out, fast=True, progress=False)

    # artefacts: datasets + tokenizer, fit outputs of each run, n-gram table, reports
    for run in ("target", "draft"):
        assert (out / run / "model" / "config.yaml").is_file()
        assert (out / run / "metrics.jsonl").read_text().strip()
        assert list((out / run / "tensorboard").glob("events.out.tfevents.*"))
        assert list((out / run / "checkpoints").iterdir())
    assert (out / "target" / "model" / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "ngram" / "manifest.json").is_file()
    assert json.loads((out / "results.json").read_text())["meta"]["size"] == "fast"
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text()

    # data: both datasets were built with a held-out split
    for reports in results["data"].values():
        assert reports[0]["written"] > 0 and reports[0]["splits"]["test"] > 0
    # training ran the asked steps and learned something
    assert results["train"]["target"]["step"] == 6 and results["train"]["draft"]["step"] == 4
    assert results["train"]["target"]["params"] > 2 * results["train"]["draft"]["params"]
    lora = results["lora"]
    assert lora["heldout_loss_before"] > 0
    assert ("unavailable" in lora) != ("heldout_loss_after" in lora)

    # decoding: one row per method, in order; greedy is the baseline; greedy-equivalent
    # methods reproduce greedy exactly; unavailable methods show no numbers
    rows = results["decode"]
    assert [r["method"] for r in rows] == [name for name, _ in DECODE_METHODS]
    assert len(results["prompts"]) == 2
    greedy = rows[0]
    assert greedy["available"] and greedy["speedup"] == 1.0 and greedy["tokens"] > 0
    for r in rows:
        if not r["available"]:
            assert r["notes"].startswith(("not available in this build", "not run:"))
            assert f"| {r['method']} | — | — | — | — |" in md
            continue
        assert r["tokens_per_s"] > 0
        if r["matches_greedy"] is not None:
            assert r["matches_greedy"] is True, r
    assert "superposed (k=3)" in [r["method"] for r in rows if r["available"]]
