"""End-to-end ``fit`` runs on 8 fake CPU devices: sharded == single device, restore onto
other meshes, NaN stops the run, SIGTERM saves, incompatible resumes fail."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from cadenza.config import load_config
from cadenza.errors import CadenzaError
from cadenza.models import load_model
from cadenza.train import NonFiniteError, SyntheticBatches, fit
from cadenza.train.checkpoints import Checkpoints
from cadenza.train.mesh import make_mesh
from cadenza.train.optim import make_optimizer
from cadenza.train.state import abstract_state, state_shardings
from cadenza.train.task import full_model_task

BASE = ["train.batch_size=8", "train.seq_len=16", "train.log_every=1", "train.warmup_steps=2",
        "train.learning_rate=1e-2", "train.progress_bar=false", "train.tensorboard=false"]


def _config(out, *overrides):
    return load_config(None, BASE + [f"train.output_dir={out}", *overrides], preset="tiny")


def _data(config, **kw):
    return SyntheticBatches(config.train.batch_size, config.train.seq_len,
                            config.model.vocab_size, **kw)


def _losses(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines}


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    config = _config(out, "train.steps=20", "train.checkpoint_every=10", "mesh.data=2",
                     "mesh.fsdp=2", "mesh.tensor=2", "train.tensorboard=true")
    return config, out, fit(config, _data(config))


def test_sharded_matches_single_device(sharded_run, tmp_path):
    config, out, summary = sharded_run
    assert summary["step"] == 20 and summary["stopped"] == "completed"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    single = _config(tmp_path, "train.steps=20", "mesh.data=1", "train.eval_every=10",
                     "train.eval_steps=2")
    held_out = _data(single, seed=1)
    result = fit(single, _data(single), held_out, devices=jax.devices()[:1])
    evals = [json.loads(x).get("eval_loss") for x in
             (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [i + 1 for i, e in enumerate(evals) if e is not None] == [10, 20]
    assert result["eval_loss"] == evals[19] and np.isfinite(evals[19])
    assert held_out.index == 2  # rewound before each eval, two batches each time
    a, b = _losses(out), _losses(tmp_path)
    assert sorted(a) == list(range(1, 21)) == sorted(b)
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=2e-4)
    assert a[20] < a[1] - 0.3  # it learns
    # the exported model directory holds the final params
    _, params = load_model(out / "model")
    assert jax.tree.structure(params) == jax.tree.structure(load_model(tmp_path / "model")[1])


@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 1, 1)])
def test_restore_onto_other_mesh(sharded_run, shape):
    config, out, _ = sharded_run
    data, fsdp, tensor = shape
    new = _config(out, "train.steps=20", f"mesh.data={data}", f"mesh.fsdp={fsdp}",
                  f"mesh.tensor={tensor}")
    devices = jax.devices()[:data * fsdp * tensor]
    task, opt = full_model_task(new.model), make_optimizer(new.train)

    def restore(cfg, devs):
        mesh = make_mesh(cfg.mesh, devs)
        shardings = state_shardings(task, opt, mesh, cfg.mesh.rules())
        ckpts = Checkpoints(out, cfg, keep=2, async_save=False)
        try:
            return ckpts.restore(20, abstract_state(task, opt, shardings))
        finally:
            ckpts.close()

    ref, ref_data = restore(config, jax.devices())
    got, got_data = restore(new, devices)
    assert got_data == ref_data == {"index": 20}
    assert int(got.step) == 20
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = got.params["layers"]["attn"]["q_proj"]["kernel"]
    assert len(q.sharding.device_set) == len(devices)
    mu = got.opt_state[1][0].mu["layers"]["attn"]["q_proj"]["kernel"]
    assert mu.sharding == q.sharding
    if fsdp == 8:
        assert q.addressable_shards[0].data.shape[1] == config.model.hidden_size // 8


class _NanAt(SyntheticBatches):
    """Synthetic batches whose loss mask is NaN in batch ``bad`` (1-based step)."""

    def __init__(self, *a, bad, **kw):
        super().__init__(*a, **kw)
        self.bad = bad

    def __next__(self):
        batch = super().__next__()
        if self.index == self.bad:
            batch["loss_mask"][0, 0] = np.nan
        return batch


def test_nan_stops_before_any_later_checkpoint(tmp_path):
    config = _config(tmp_path, "train.steps=12", "train.checkpoint_every=3",
                     "train.log_every=5", "mesh.data=1", "train.async_checkpoints=false")
    data = _NanAt(8, 16, 512, bad=8)
    with pytest.raises(NonFiniteError, match="at step 8"):
        fit(config, data, devices=jax.devices()[:1])
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    assert not (tmp_path / "model").exists()


class _SigtermAt(SyntheticBatches):
    def __init__(self, *a, at, **kw):
        super().__init__(*a, **kw)
        self.at = at

    def __next__(self):
        if self.index == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()


def test_sigterm_saves_and_rerun_resumes_then_config_change_fails(tmp_path):
    config = _config(tmp_path, "train.steps=8", "mesh.data=1")
    one = jax.devices()[:1]
    summary = fit(config, _SigtermAt(8, 16, 512, at=4), devices=one)
    assert summary["stopped"] == "sigterm" and summary["step"] == 5
    assert summary["model_dir"] is None
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == [5]
    data = _data(config)
    summary = fit(config, data, devices=one)
    assert summary["resumed_from"] == 5 and summary["step"] == 8 and data.index == 8
    assert sorted(_losses(tmp_path)) == list(range(1, 9))
    with pytest.raises(CadenzaError, match="model.num_layers: checkpoint has 2"):
        fit(_config(tmp_path, "train.steps=9", "mesh.data=1", "model.num_layers=3"), data,
            devices=one)
    with pytest.raises(CadenzaError, match="data.seed"):
        fit(_config(tmp_path, "train.steps=9", "mesh.data=1", "data.seed=1"), data, devices=one)


def test_mesh_errors_come_before_compiling(tmp_path):
    with pytest.raises(CadenzaError, match=r"multiply to 3, but there are 8 devices"):
        fit(_config(tmp_path, "mesh.data=3"), None)
    with pytest.raises(CadenzaError, match=r"num_kv_heads=2 .* 8 shards of mesh axes tensor=8"):
        fit(_config(tmp_path, "mesh.data=1", "mesh.tensor=8"), None)
    assert not (tmp_path / "checkpoints").exists()


def test_cli_train_reports_config_errors(capsys):
    from cadenza.cli import main

    assert main(["train", "tiny_pretrain", "mesh.data=3"]) == 2
    assert "multiply to 3, but there are 8 devices" in capsys.readouterr().err


class _OneBatch:
    """A held-out split with a single batch (the iterator protocol ends after it)."""

    def __init__(self, config):
        self.inner, self.left = _data(config, seed=9), 1

    def __iter__(self):
        return self

    def __next__(self):
        if not self.left:
            raise StopIteration
        self.left -= 1
        return next(self.inner)

    def get_state(self):
        return {"left": self.left}

    def set_state(self, state):
        self.left = state["left"]


def test_eval_stops_at_the_end_of_a_short_heldout_split(tmp_path):
    config = _config(tmp_path / "short", "train.steps=2", "train.eval_every=2",
                     "train.eval_steps=4")
    summary = fit(config, data=_data(config), eval_data=_OneBatch(config),
                  devices=jax.devices()[:1])
    assert summary["eval_loss"] is not None and summary["eval_loss"] > 0
