"""A run killed with SIGKILL mid-training and resumed reproduces the uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from cadenza.config import load_config
from cadenza.train import SyntheticBatches, fit

OVERRIDES = ["train.batch_size=8", "train.seq_len=16", "train.log_every=1", "train.steps=12",
             "train.checkpoint_every=4", "train.warmup_steps=2", "train.learning_rate=1e-2",
             "train.progress_bar=false", "train.tensorboard=false", "mesh.data=2", "mesh.fsdp=4"]

# The killed run: the same fit, its batches slowed so the parent can kill it mid-run.
SCRIPT = """
import sys, time
from cadenza.config import load_config
from cadenza.train import SyntheticBatches, fit

class Slow(SyntheticBatches):
    def __next__(self):
        time.sleep(0.4)
        return super().__next__()

config = load_config(None, sys.argv[1:], preset="tiny")
fit(config, Slow(8, 16, config.model.vocab_size))
"""


def _config(out):
    return load_config(None, OVERRIDES + [f"train.output_dir={out}"], preset="tiny")


def _curve(out):
    return {r["step"]: r["loss"] for r in
            map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _saved_steps(out):
    d = out / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_sigkill_then_resume_reproduces_the_loss_curve(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, *OVERRIDES,
                             f"train.output_dir={killed}"], env=dict(os.environ))
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            metrics = killed / "metrics.jsonl"
            if _saved_steps(killed) and metrics.exists() and max(_curve(killed), default=0) >= 6:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    steps_at_kill = max(_curve(killed))
    assert 4 in _saved_steps(killed) and steps_at_kill < 12

    config = _config(killed)
    resumed = fit(config, SyntheticBatches(8, 16, 512))
    assert resumed["resumed_from"] in (4, 8) and resumed["resumed_from"] <= steps_at_kill
    assert resumed["step"] == 12

    fit(_config(clean), SyntheticBatches(8, 16, 512))
    a, b = _curve(killed), _curve(clean)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    np.testing.assert_allclose([a[s] for s in b], [b[s] for s in b], rtol=1e-5)
    assert _saved_steps(killed) == [8, 12]  # keep_checkpoints=2
