"""URLs (gs:// served from memory) as model inputs and as ``train.output_dir``: local copies
reused while unchanged, incomplete folders refused, runs mirrored, resumed and exported."""

import json
import pathlib

import jax
import numpy as np
import pytest

from cadenza.config import load_config
from cadenza.errors import CadenzaError
from cadenza.models import load_model, save_model
from cadenza.models.params import init_params
from cadenza.outputs import MARKER
from cadenza.remote import RunMirror, local_model_dir
from cadenza.train import SyntheticBatches, fit

BASE = ["train.batch_size=4", "train.seq_len=16", "train.log_every=1", "train.warmup_steps=1",
        "train.progress_bar=false", "train.tensorboard=false"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CADENZA_REMOTE_CACHE", str(tmp_path / "cache"))


def _upload(fs, local: pathlib.Path, url_path: str, skip=()):
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = f.relative_to(local).as_posix()
        if rel not in skip:
            fs.pipe(f"{url_path}/{rel}", f.read_bytes())


def test_remote_model_dir_is_copied_once_and_loads(fake_gcs, tmp_path):
    config = load_config(None, [], preset="tiny")
    params = init_params(config.model, jax.random.key(0))
    save_model(tmp_path / "m", config, params)
    _upload(fake_gcs, tmp_path / "m", "bucket/m")
    cfg, loaded = load_model("gs://bucket/m")
    assert cfg.model == config.model
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    local = local_model_dir("gs://bucket/m")
    stamp = (local / "config.yaml").stat().st_mtime_ns
    assert local_model_dir("gs://bucket/m") == local  # reused, not downloaded again
    assert (local / "config.yaml").stat().st_mtime_ns == stamp
    # an incomplete remote model directory (its writer was killed) is refused
    _upload(fake_gcs, tmp_path / "m", "bucket/half",
            skip={MARKER, "params/commit_success.txt"})
    with pytest.raises(CadenzaError, match="incomplete"):
        load_model("gs://bucket/half")
    with pytest.raises(CadenzaError, match="no such remote model directory"):
        load_model("gs://bucket/absent")


def test_mirror_ignores_files_of_a_killed_push(fake_gcs, tmp_path):
    mirror = RunMirror("gs://bucket/run")
    mirror.pull()
    (mirror.local / "a.txt").write_text("a")
    assert mirror.push() == 1
    # a push killed before its manifest: b.txt reached the bucket but is not listed
    fake_gcs.pipe("bucket/run/b.txt", b"b")
    again = RunMirror("gs://bucket/run")
    (again.local / "a.txt").unlink()
    assert again.pull() == 1
    assert sorted(p.name for p in again.local.iterdir()) == ["a.txt"]
    (again.local / "a.txt").unlink()  # deleted by the run: deleted remotely after a push
    (again.local / "c.txt").write_text("c")
    again.push()
    assert not fake_gcs.exists("bucket/run/a.txt") and fake_gcs.exists("bucket/run/c.txt")


def test_fit_into_a_url_resumes_and_exports(fake_gcs):
    config = load_config(None, BASE + ["train.output_dir=gs://bucket/run", "train.steps=4",
                                       "train.checkpoint_every=2"], preset="tiny")
    data = SyntheticBatches(4, 16, config.model.vocab_size)
    summary = fit(config, data, devices=jax.devices()[:1])
    assert summary["model_dir"] == "gs://bucket/run/model"
    assert fake_gcs.exists(f"bucket/run/model/{MARKER}")
    manifest = json.loads(fake_gcs.cat("bucket/run/.cadenza-remote.json"))
    assert "metrics.jsonl" in manifest and f"model/{MARKER}" in manifest
    _, params = load_model("gs://bucket/run/model")
    # a new machine (empty local cache) continues the run from the bucket
    fake_cache = pathlib.Path(str(RunMirror("gs://bucket/run").local))
    for f in sorted(fake_cache.rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    longer = load_config(None, BASE + ["train.output_dir=gs://bucket/run", "train.steps=6",
                                       "train.checkpoint_every=2"], preset="tiny")
    again = fit(longer, SyntheticBatches(4, 16, config.model.vocab_size), allow_changes=True,
                devices=jax.devices()[:1])
    assert again["resumed_from"] == 4 and again["step"] == 6
    lines = fake_gcs.cat("bucket/run/metrics.jsonl").decode().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 7))
    assert jax.tree.structure(load_model("gs://bucket/run/model")[1]) == \
        jax.tree.structure(params)
