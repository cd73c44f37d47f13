"""Samplers: filters against hand computations and Hugging Face's warpers, seeded draws."""

import json
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.decode import sampling
from cadenza.decode.config import DecodeConfig, SamplingConfig, SamplingSpec
from cadenza.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROBS = np.array([[0.15, 0.5, 0.05, 0.3]])     # deliberately unsorted
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32)) + 3.0


def probs_of(spec, logits=LOGITS, seen=None):
    return np.exp(np.asarray(sampling.log_probs(logits, spec, seen)))


def test_top_k_keeps_k_largest_and_ties():
    z = jnp.array([[1.0, 3.0, 2.0, 5.0, 4.0]])
    out = np.asarray(sampling.top_k_filter(z, 2))
    np.testing.assert_array_equal(out, [[-np.inf, -np.inf, -np.inf, 5.0, 4.0]])
    tied = np.asarray(sampling.top_k_filter(jnp.array([[1.0, 2.0, 2.0, 0.0]]), 1))
    np.testing.assert_array_equal(tied, [[-np.inf, 2.0, 2.0, -np.inf]])


@pytest.mark.parametrize("top_p, expected", [
    (0.4, [0.0, 1.0, 0.0, 0.0]),                  # the top token alone already has 0.5 >= 0.4
    (0.7, [0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]),      # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    (0.9, [0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95]),
    (1.0, [0.15, 0.5, 0.05, 0.3]),
])
def test_top_p_hand_computed(top_p, expected):
    got = probs_of(SamplingSpec(method="sample", top_p=top_p))
    np.testing.assert_allclose(got[0], expected, atol=1e-6)


def test_min_p_hand_computed():
    # threshold 0.2 * 0.5 = 0.1: drops 0.05 only
    got = probs_of(SamplingSpec(method="sample", min_p=0.2))
    np.testing.assert_allclose(got[0], [0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95], atol=1e-6)


def test_top_k_then_top_p_then_min_p_order():
    # top_k=3 drops 0.05; top_p=0.9 over {0.5, 0.3, 0.15}/0.95 keeps all three
    # (0.5/0.95 + 0.3/0.95 = 0.842 < 0.9); min_p=0.4 then drops 0.15 (< 0.4 * 0.5).
    got = probs_of(SamplingSpec(method="sample", top_k=3, top_p=0.9, min_p=0.4))
    np.testing.assert_allclose(got[0], [0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8], atol=1e-6)


def test_temperature_and_greedy_ignores_warpers():
    z = jnp.array([[1.0, 2.0, 0.5]])
    got = np.asarray(sampling.log_probs(z, SamplingSpec(method="sample", temperature=2.0)))
    np.testing.assert_allclose(got, jax.nn.log_softmax(z / 2.0), atol=1e-6)
    greedy = np.asarray(sampling.log_probs(z, SamplingSpec(method="greedy", temperature=2.0,
                                                           top_k=1)))
    np.testing.assert_allclose(greedy, jax.nn.log_softmax(z), atol=1e-6)


def test_repetition_penalty_hand_computed():
    z = jnp.array([[2.0, -2.0, 1.0]])
    seen = jnp.array([[True, True, False]])
    np.testing.assert_allclose(np.asarray(sampling.repetition_penalty(z, seen, 2.0)),
                               [[1.0, -4.0, 1.0]])
    spec = SamplingSpec(repetition_penalty=2.0)
    assert spec.uses_history
    np.testing.assert_allclose(np.asarray(sampling.log_probs(z, spec, seen)),
                               jax.nn.log_softmax(jnp.array([[1.0, -4.0, 1.0]])), atol=1e-6)


def test_select_greedy_and_seeded_sampling():
    spec = SamplingSpec(method="sample")
    logp = jnp.log(jnp.asarray(np.tile(PROBS, (4000, 1)), jnp.float32))
    keys = sampling.row_keys(jnp.arange(4000, dtype=jnp.int32))
    tok, lp = sampling.select(logp, spec, keys, 3)
    freq = np.bincount(np.asarray(tok), minlength=4) / 4000
    np.testing.assert_allclose(freq, PROBS[0], atol=0.03)
    np.testing.assert_allclose(np.asarray(lp), np.log(PROBS[0])[np.asarray(tok)], rtol=1e-5)
    again, _ = sampling.select(logp, spec, keys, 3)
    np.testing.assert_array_equal(np.asarray(tok), np.asarray(again))
    other, _ = sampling.select(logp, spec, keys, 4)
    assert (np.asarray(other) != np.asarray(tok)).mean() > 0.3
    g, glp = sampling.select(logp[:2], SamplingSpec())
    np.testing.assert_array_equal(np.asarray(g), [1, 1])
    np.testing.assert_allclose(np.asarray(glp), np.log(0.5), rtol=1e-6)


def test_filters_never_remove_everything():
    z = jnp.array([[0.0, 0.0, 0.0], [5.0, -5.0, -5.0]])
    spec = SamplingSpec(method="sample", top_k=1, top_p=1e-6, min_p=0.99)
    p = probs_of(spec, z)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(p[0], [1 / 3] * 3, atol=1e-6)   # ties all survive


@pytest.mark.parametrize("cls, override", [
    (SamplingConfig, dict(top_p=0.0)), (SamplingConfig, dict(top_p=1.5)),
    (SamplingConfig, dict(top_k=-1)), (SamplingConfig, dict(min_p=1.0)),
    (SamplingConfig, dict(temperature=0.0)), (DecodeConfig, dict(max_new_tokens=0)),
    (DecodeConfig, dict(method="beam")), (DecodeConfig, dict(stop=[""])),
    (DecodeConfig, dict(chunk_steps=0))])
def test_bad_settings_fail_in_config(cls, override):
    with pytest.raises(ConfigError):
        cls(**override)


HF_SCRIPT = r"""
import json, sys, torch
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
    TopPLogitsWarper)
case = json.loads(sys.stdin.read())
z = torch.tensor(case["logits"], dtype=torch.float32)
ids = torch.tensor(case["ids"])
out = []
for s in case["specs"]:
    procs = [RepetitionPenaltyLogitsProcessor(s["repetition_penalty"]),
             TemperatureLogitsWarper(s["temperature"])]
    if s["top_k"]:
        procs.append(TopKLogitsWarper(s["top_k"]))
    if s["top_p"] < 1:
        procs.append(TopPLogitsWarper(s["top_p"]))
    if s["min_p"] > 0:
        procs.append(MinPLogitsWarper(s["min_p"]))
    w = LogitsProcessorList(procs)(ids, z.clone())
    out.append(torch.log_softmax(w, -1).tolist())
print(json.dumps(out))
"""


def test_processing_matches_transformers():
    """Same final distribution as transformers' processors (repetition penalty + warpers)."""
    python = ROOT / ".venv-ref" / "bin" / "python"
    if not python.exists():
        pytest.fail("reference env missing: run `make ref-env`")
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 40)) * 2).astype(np.float32)
    ids = rng.integers(0, 40, (3, 6))
    specs = [SamplingSpec(method="sample", temperature=0.7, top_k=10, repetition_penalty=1.3),
             SamplingSpec(method="sample", top_p=0.8, min_p=0.05),
             SamplingSpec(method="sample", temperature=1.5, top_k=25, top_p=0.6, min_p=0.1,
                          repetition_penalty=0.8)]
    case = {"logits": logits.tolist(), "ids": ids.tolist(),
            "specs": [s.__dict__ for s in specs]}
    proc = subprocess.run([str(python), "-c", HF_SCRIPT], input=json.dumps(case),
                          capture_output=True, text=True, check=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    expected = np.array(json.loads(proc.stdout))
    seen = np.zeros((3, 40), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    for spec, exp in zip(specs, expected):
        got = np.asarray(sampling.log_probs(jnp.asarray(logits), spec, jnp.asarray(seen)))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(exp))
        finite = np.isfinite(exp)
        np.testing.assert_allclose(got[finite], exp[finite], atol=1e-5)
