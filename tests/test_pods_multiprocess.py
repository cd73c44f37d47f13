"""Two JAX processes on this machine (4 fake CPU devices each, localhost coordinator)
must compute what one process with 8 devices computes.

The test runs this file as a script for each worker process.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

CONFIG = ["mesh.data=2", "mesh.fsdp=4", "train.batch_size=8", "train.seq_len=32"]


def sharded_loss_and_grads():
    """Loss and grads of the AOT-lowered train step on all devices, as host numpy,
    plus the psum of every device's index (each host feeds only its own batch rows)."""
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from cadenza.config import load_config
    from cadenza.models import init_params
    from cadenza.train.aot import lower_train_step
    from cadenza.train.mesh import make_mesh

    cfg = load_config("tiny_pretrain", CONFIG)
    mesh = make_mesh(cfg.mesh)
    step = lower_train_step(cfg, mesh)
    params = init_params(cfg.model, jax.random.key(0), mesh, cfg.mesh.rules())
    b, t = cfg.train.batch_size, cfg.train.seq_len
    data = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (b, t + 1), np.int32)
    sharding = step.args[1].sharding
    inputs, targets = (jax.make_array_from_callback((b, t), sharding, lambda i, a=a: a[i])
                       for a in (data[:, :-1], data[:, 1:]))
    loss, grads = step.lowered.compile()(params, inputs, targets)

    axes = tuple(mesh.axis_names)
    ids = jax.make_array_from_callback(
        (len(jax.devices()),), NamedSharding(mesh, P(axes)),
        lambda i: np.arange(len(jax.devices()), dtype=np.float32)[i])
    total = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, axes), mesh=mesh,
                                  in_specs=P(axes), out_specs=P()))(ids)
    grads = multihost_utils.process_allgather(grads, tiled=True)
    flat = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(grads)[0]}
    return float(loss), float(np.asarray(total.addressable_data(0))[0]), flat


def worker(out_dir: str) -> None:
    from cadenza.train.distributed import initialize

    layout = initialize()
    import jax

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    loss, total, grads = sharded_loss_and_grads()
    if layout.process_id == 0:
        np.savez(pathlib.Path(out_dir) / "grads.npz", **grads)
        (pathlib.Path(out_dir) / "result.json").write_text(
            json.dumps({"loss": loss, "psum": total, "process_count": jax.process_count()}))


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


def run_two_processes(out_dir, mode: str, timeout=240):
    port = free_port_pair()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", CADENZA_COORDINATOR=f"127.0.0.1:{port}",
               CADENZA_NUM_PROCESSES="2", CADENZA_INIT_TIMEOUT="120")
    procs = [subprocess.Popen([sys.executable, __file__, mode, str(out_dir)],
                              env=dict(env, CADENZA_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


def test_two_processes_match_one_process_with_eight_devices(tmp_path):
    run_two_processes(tmp_path, "grads")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["process_count"] == 2
    assert result["psum"] == sum(range(8))
    loss, _, grads = sharded_loss_and_grads()  # this process: 8 fake devices (conftest)
    assert abs(result["loss"] - loss) < 1e-5
    with np.load(tmp_path / "grads.npz", allow_pickle=False) as multi:
        assert sorted(multi.files) == sorted(grads)
        for name, g in grads.items():
            np.testing.assert_allclose(multi[name], g, rtol=1e-4, atol=1e-6, err_msg=name)


if __name__ == "__main__":
    {"grads": worker}[sys.argv[1]](sys.argv[2])
