"""Metrics backends: JSONL, TensorBoard (namespaced tags, hyperparameters), text log lines
(ETA from step time), W&B offline; and the trainer's choice of bar or text lines."""

import json

from cadenza.config import load_config
from cadenza.train.metrics import (
    MetricsWriter,
    TensorBoardMetrics,
    TextLogMetrics,
    WandbMetrics,
    flat_hparams,
    tensorboard_tag,
)

RECORDS = [(10, {"loss": 2.5, "lr": 1e-3, "step_time_s": 0.5, "tokens_per_s": 100.0,
                 "mfu": None}),
           (20, {"loss": 2.0, "lr": 1e-3, "eval_loss": 2.2, "step_time_s": 0.25})]


def _write(writer):
    for step, record in RECORDS:
        writer.write(step, record)
    writer.close()


def test_tags_and_hparams_are_flat_scalars():
    assert tensorboard_tag("loss") == "train/loss"
    assert tensorboard_tag("eval_loss") == "eval/loss"
    hp = flat_hparams(load_config("tiny_pretrain", ["train.steps=7"]))
    assert hp["train.steps"] == 7 and hp["model.preset"] == "tiny"
    assert all(isinstance(v, (str, int, float, bool)) for v in hp.values())


def test_jsonl_text_and_tensorboard(tmp_path, capsys):
    config = load_config("tiny_pretrain", [])
    text = TextLogMetrics(tmp_path, total_steps=100, name="[run]", echo=True)
    _write(MetricsWriter(tmp_path, [text, TensorBoardMetrics(tmp_path, flat_hparams(config),
                                                             "name: x")]))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 10, "loss": 2.5, "lr": 1e-3, "step_time_s": 0.5,
                       "tokens_per_s": 100.0}  # None dropped
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert lines == capsys.readouterr().out.splitlines()  # echoed to stdout
    assert lines[0].startswith("[run] step 10/100 | loss 2.5000 | lr 1.00e-03")
    assert lines[0].endswith("eta 45s")  # 90 steps left at 0.5 s, compile not counted
    assert "eval_loss 2.2000" in lines[1] and lines[1].endswith("eta 20s")
    events = _events(tmp_path / "tensorboard")
    scalars = [(v.tag, e.step) for e in events for v in e.summary.value
               if v.HasField("simple_value")]
    assert {"train/loss", "train/lr", "eval/loss", "train/step_time_s"} <= {t for t, _ in scalars}
    assert [s for t, s in scalars if t == "train/loss"] == [10, 20]
    assert "loss" not in {t for t, _ in scalars}
    hparams = [v for e in events for v in e.summary.value
               if v.metadata.plugin_data.plugin_name == "hparams"]
    assert {v.tag for v in hparams} >= {"_hparams_/experiment", "_hparams_/session_start_info"}
    assert any(b"train.steps" in v.metadata.plugin_data.content for v in hparams)


def _events(directory):
    """The Event protos of the TFRecord event files in ``directory`` (8-byte length,
    4-byte CRC, payload, 4-byte CRC per record)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(Event.FromString(data[pos + 12:pos + 12 + n]))
            pos += 12 + n + 4
    return events


def test_wandb_offline(tmp_path, monkeypatch):
    import wandb  # the dev group installs it; the wandb extra for users
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    backend = WandbMetrics(tmp_path, "cadenza-test", "run1", {"train.steps": 3})
    try:
        run = backend._run
        for step, record in RECORDS:
            backend.write(step, {k: v for k, v in record.items() if v is not None})
        assert run.summary["train/loss"] == 2.0 and run.summary["eval/loss"] == 2.2
        assert run.config["train.steps"] == 3
        backend.close()
    finally:  # stop wandb's service process: it would outlive this test in the worker
        wandb.teardown()
    (log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")  # for a later `wandb sync`
    assert log.stat().st_size > 0 and wandb.run is None
