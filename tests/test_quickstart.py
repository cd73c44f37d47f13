"""A shortened quickstart (``fast=True``: tiny models, a few steps) end to end on 8 fake CPU
devices: every artefact lands under the output dir, the table is honest, and a second run
into the same folder reuses or resumes every stage."""

import json

from cadenza.models import Transformer, load_model
from cadenza.quickstart import DECODE_METHODS, LUD_BETAS, choose_lud_beta, run_quickstart


def test_fast_quickstart_end_to_end_and_rerun(tmp_path):
    out = tmp_path / "qs"
    results = run_quickstart(out_dir=out, fast=True, progress=False)

    # artefacts: datasets + tokenizer, fit outputs of each run, n-gram table, reports
    for run in ("target", "draft", "distill"):
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
    # the draft distilled from the tuned target: same architecture, its own weights
    assert results["train"]["distill"]["step"] == 3
    assert results["train"]["distill"]["params"] == results["train"]["draft"]["params"]
    lora = results["lora"]
    assert lora["heldout_loss_after"] < lora["heldout_loss_before"]
    # baselines and the measured task, before and after LoRA
    assert 0 < results["unigram"]["code"]["heldout"] < 10
    for key in ("before", "after"):
        task = results["task"][key]
        assert task["examples"] == 2 and 0 <= task["pass@1"] <= 1
    # the report shows held-out prompts with the greedy completions before and after LoRA
    assert results["samples"] and "Original body:" in md
    for s in results["samples"]:
        assert s["header"] in md and "Pretrained target:" in md and "After LoRA:" in md

    # decoding: one row per method, in order; greedy is the baseline; greedy-equivalent
    # methods reproduce greedy exactly; unavailable methods show no numbers
    rows = results["decode"]["rows"]
    assert [r["method"] for r in rows] == [name for name, _ in DECODE_METHODS]
    assert results["decode"]["prompts"] == 2 and results["decode"]["repeats"] == 2
    greedy = rows[0]
    assert greedy["available"] and greedy["speedup"]["median"] == 1.0 and greedy["tokens"] > 0
    for r in rows:
        if not r["available"]:
            assert r["notes"].startswith(("not available in this build", "not run:"))
            assert f"| {r['method']} | — | — | — | — |" in md
            continue
        assert r["tokens_per_s"]["min"] > 0
        if r["matches_greedy"] is not None:
            assert r["matches_greedy"] is True, r
    available = {r["method"] for r in rows if r["available"]}
    assert {"superposed (k=3)", "Medusa", "LUD", "sampling (T=0.8)",
            "speculative (distilled draft)", "speculative (LM-pretrained draft)",
            "Token Recycling", "layer-skip"} <= available
    # LUD's beta: no spare held-out prompts at this size, so the default, unswept; with
    # prompts, every beta is tried and the one chosen is among them
    assert results["train"]["lud"]["beta"] == 0.9 and results["train"]["lud"]["beta_sweep"] == {}
    lud_cfg, lud_params = load_model(results["train"]["lud"]["model_dir"])
    beta, sweep = choose_lud_beta(Transformer(lud_cfg.model), lud_params, [[5, 6, 7, 8]], 4)
    assert list(sweep) == list(LUD_BETAS) and beta in LUD_BETAS
    assert all(1.0 <= v <= 4 for v in sweep.values())
    for name in results["decode"]["method_samples"]["texts"]:
        assert f"{name}:" in md

    # a second run reuses the finished stages; one whose record is gone resumes its
    # finished training run (nothing left to train) and reports the same numbers
    (out / "stages" / "target.json").unlink()
    (out / "stages" / "decode.json").unlink()
    again = run_quickstart(out_dir=out, fast=True, progress=False)
    assert again["train"]["target"]["loss"] == results["train"]["target"]["loss"]
    assert again["train"]["target"]["step"] == 6
    assert again["lora"] == results["lora"] and again["task"] == results["task"]
    assert [r["method"] for r in again["decode"]["rows"]] == [r["method"] for r in rows]
    assert (out / "results.md").read_text().count("| greedy |") == 1
