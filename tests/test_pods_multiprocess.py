"""Two JAX processes on this machine (4 fake CPU devices each, localhost coordinator)
train, checkpoint and resume exactly like one process with 8 devices.

The test runs this file as a script for each worker process.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

BASE = ["train.batch_size=8", "train.seq_len=16", "train.log_every=1", "train.warmup_steps=2",
        "train.learning_rate=1e-2", "train.progress_bar=false", "train.tensorboard=false",
        "train.checkpoint_every=3", "mesh.data=2", "mesh.fsdp=4"]


def config(out, steps: int):
    from cadenza.config import load_config

    return load_config(None, BASE + [f"train.output_dir={out}", f"train.steps={steps}"],
                       preset="tiny")


class HostShare:
    """The rows of a global synthetic batch that this process's devices hold: each host
    reads only its share (``train.batch_size // process_count`` rows)."""

    def __init__(self, cfg):
        import jax

        from cadenza.train import SyntheticBatches
        from cadenza.train.mesh import batch_sharding, make_mesh

        b, t = cfg.train.batch_size, cfg.train.seq_len
        self.data = SyntheticBatches(b, t, cfg.model.vocab_size)
        sharding = batch_sharding(make_mesh(cfg.mesh), cfg.mesh.rules())
        rows = {r for idx in sharding.addressable_devices_indices_map((b, t)).values()
                for r in range(b)[idx[0]]}
        self.rows = sorted(rows)
        assert len(self.rows) == b // jax.process_count()

    def __iter__(self):
        return self

    def __next__(self):
        return {k: v[self.rows] for k, v in next(self.data).items()}

    def get_state(self):
        return self.data.get_state()

    def set_state(self, state):
        self.data.set_state(state)


def psum_of_device_ids() -> float:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((jax.device_count(),), ("all",))
    ids = jax.make_array_from_callback(
        (jax.device_count(),), NamedSharding(mesh, P("all")),
        lambda i: np.arange(jax.device_count(), dtype=np.float32)[i])
    total = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, "all"), mesh=mesh,
                                  in_specs=P("all"), out_specs=P()))(ids)
    return float(np.asarray(total.addressable_data(0))[0])


def train_then_resume(out) -> list[dict]:
    """fit 6 steps (checkpoints at 3 and 6), then a second fit to 9 steps that resumes."""
    from cadenza.train import fit

    first = config(out, 6)
    second = config(out, 9)
    return [fit(first, HostShare(first)), fit(second, HostShare(second), allow_changes=True)]


def worker(out_dir: str) -> None:
    from cadenza.train.distributed import initialize

    layout = initialize()
    import jax

    facts = {"process_count": jax.process_count(), "devices": jax.device_count(),
             "local_devices": jax.local_device_count(), "psum": psum_of_device_ids()}
    summaries = train_then_resume(pathlib.Path(out_dir) / "run")
    if layout.process_id == 0:
        facts["resumed_from"] = [s["resumed_from"] for s in summaries]
        (pathlib.Path(out_dir) / "facts.json").write_text(json.dumps(facts))


def free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def run_two_processes(out_dir, timeout=400):
    port = free_port_pair()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", CADENZA_COORDINATOR=f"127.0.0.1:{port}",
               CADENZA_NUM_PROCESSES="2", CADENZA_INIT_TIMEOUT="120")
    procs = [subprocess.Popen([sys.executable, __file__, str(out_dir)],
                              env=dict(env, CADENZA_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = []
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]


def losses(run) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines}


def test_two_processes_train_checkpoint_resume_like_one_process(tmp_path):
    import jax

    from cadenza.models import load_model
    from cadenza.train.mesh import make_mesh

    run_two_processes(tmp_path / "multi")
    facts = json.loads((tmp_path / "multi" / "facts.json").read_text())
    assert facts == {"process_count": 2, "devices": 8, "local_devices": 4,
                     "psum": float(sum(range(8))), "resumed_from": [None, 6]}
    summaries = train_then_resume(tmp_path / "single" / "run")  # here: 8 devices (conftest)
    assert [s["resumed_from"] for s in summaries] == [None, 6]
    multi, single = losses(tmp_path / "multi" / "run"), losses(tmp_path / "single" / "run")
    assert sorted(multi) == list(range(1, 10)) == sorted(single)
    np.testing.assert_allclose([multi[s] for s in single], list(single.values()), rtol=2e-4)
    # the model the two processes wrote together equals the single-process one (restored
    # onto this process's mesh: orbax needs target shardings for another device set)
    cfg = config(tmp_path, 9)
    mesh = make_mesh(cfg.mesh)
    _, a = load_model(tmp_path / "multi" / "run" / "model", mesh, cfg.mesh.rules())
    _, b = load_model(tmp_path / "single" / "run" / "model", mesh, cfg.mesh.rules())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-3, atol=2e-5)


if __name__ == "__main__":
    worker(sys.argv[1])
