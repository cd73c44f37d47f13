"""The multi-host runtime: who the processes are, a roll call, then ``jax.distributed``.

Where the process layout comes from, first match wins:

1. environment variables ``CADENZA_COORDINATOR`` (``host:port`` of process 0's
   JAX coordinator), ``CADENZA_NUM_PROCESSES``, ``CADENZA_PROCESS_ID`` (GPU
   clusters, CPU tests, anything else; the SLURM template sets them);
2. JAX's own cluster detection (Cloud TPU VMs and pods, SLURM, Open MPI);
3. otherwise a single process, and ``jax.distributed`` is not started.

Why a roll call: when a host never shows up, ``jax.distributed.initialize``
waits for its timeout and then *aborts the process* from C++ with
"DEADLINE_EXCEEDED ... RegisterTask", naming nobody (measured with jax
0.12.0.1; the abort cannot be caught in Python). So before calling it,
every process reports to a small TCP server that process 0 runs on the
coordinator's host at the coordinator port + 1 (``CADENZA_ROLLCALL_PORT``
overrides). Process 0 waits up to ``CADENZA_INIT_TIMEOUT`` seconds (default
300) for all ids; then either everyone proceeds to ``jax.distributed`` (which
finds all peers present) or every process raises a :class:`CadenzaError`
naming the missing process ids and the hosts that did join. A process that
cannot reach process 0 says so. Duplicate ids and disagreeing process counts
are caught the same way.

Logging: :func:`setup_logging` sends the ``cadenza`` logger's INFO messages
from process 0 only; warnings and errors come from every process, prefixed
with its id.
"""

import dataclasses
import json
import logging
import os
import select
import socket
import sys
import time

from cadenza.errors import CadenzaError

ENV_COORDINATOR = "CADENZA_COORDINATOR"
ENV_NUM_PROCESSES = "CADENZA_NUM_PROCESSES"
ENV_PROCESS_ID = "CADENZA_PROCESS_ID"
ENV_INIT_TIMEOUT = "CADENZA_INIT_TIMEOUT"
ENV_ROLLCALL_PORT = "CADENZA_ROLLCALL_PORT"
DEFAULT_INIT_TIMEOUT_S = 300

log = logging.getLogger("cadenza")


@dataclasses.dataclass(frozen=True)
class ProcessLayout:
    """This process's place in the job.

    ``coordinator`` is ``host:port`` of process 0's JAX coordinator (None for a
    single process); ``source`` says where the layout came from ("env",
    "auto", "single"); ``local_device_ids`` restricts the visible devices
    (set by cluster detection for one-process-per-GPU jobs) or is None.
    """

    coordinator: str | None
    num_processes: int
    process_id: int
    source: str
    local_device_ids: tuple[int, ...] | None = None
    timeout_s: int = DEFAULT_INIT_TIMEOUT_S

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1

    def rollcall_address(self, env=None) -> tuple[str, int]:
        env = os.environ if env is None else env
        host, _, port = self.coordinator.rpartition(":")
        rc_port = env.get(ENV_ROLLCALL_PORT)
        return host.strip("[]"), int(rc_port) if rc_port else int(port) + 1


def _env_int(env, name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise CadenzaError(f"{name}={value!r} is not an integer", where=name,
                           fix=f"set {name} to a whole number") from None


def _auto_detect(timeout_s: int):
    """JAX's cluster detection (TPU VMs, SLURM, Open MPI): (coordinator, count, id, local ids).

    Uses JAX's private ``jax._src.clusters`` so the roll call can run on exactly
    the layout ``jax.distributed.initialize`` would pick itself.
    """
    from jax._src import clusters

    return clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, timeout_s)


def resolve_layout(env=None, *, auto_detect: bool = True) -> ProcessLayout:
    """Work out the process layout from ``env`` (default ``os.environ``), see the module doc.

    Raises CadenzaError for partial or inconsistent settings (e.g. a process id
    without a coordinator, or an id outside ``[0, num_processes)``).
    """
    env = os.environ if env is None else env
    timeout_s = _env_int(env, ENV_INIT_TIMEOUT) or DEFAULT_INIT_TIMEOUT_S
    coordinator = env.get(ENV_COORDINATOR) or None
    count = _env_int(env, ENV_NUM_PROCESSES)
    pid = _env_int(env, ENV_PROCESS_ID)
    if coordinator or count is not None or pid is not None:
        missing = [n for n, v in ((ENV_COORDINATOR, coordinator), (ENV_NUM_PROCESSES, count),
                                  (ENV_PROCESS_ID, pid)) if v is None]
        if missing:
            raise CadenzaError(f"incomplete multi-process settings: {', '.join(missing)} "
                               "not set", where="environment",
                               fix=f"set all of {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and "
                                   f"{ENV_PROCESS_ID}, or none of them")
        layout = ProcessLayout(coordinator, count, pid, "env", timeout_s=timeout_s)
    elif auto_detect and (found := _auto_detect(timeout_s))[0] is not None:
        coordinator, count, pid, local_ids = found
        layout = ProcessLayout(coordinator, int(count), int(pid), "auto",
                               tuple(local_ids) if local_ids else None, timeout_s)
    else:
        return ProcessLayout(None, 1, 0, "single", timeout_s=timeout_s)
    if layout.num_processes < 1 or not 0 <= layout.process_id < layout.num_processes:
        raise CadenzaError(f"process id {layout.process_id} is outside [0, "
                           f"{layout.num_processes})", where=ENV_PROCESS_ID,
                           fix="number the processes 0 .. num_processes-1")
    if ":" not in layout.coordinator:
        raise CadenzaError(f"coordinator address {layout.coordinator!r} has no port",
                           where=ENV_COORDINATOR, fix="use host:port, e.g. 10.0.0.2:8476")
    return layout


def _send(conn, message: dict):
    conn.sendall((json.dumps(message) + "\n").encode())


def _recv_line(conn, deadline: float) -> dict | None:
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(4096)
        except (TimeoutError, ConnectionError, OSError):
            return None
        if not chunk:
            return None
        data += chunk
    return json.loads(data)


def _describe(joined: dict[int, str]) -> str:
    return ", ".join(f"{i} ({host})" for i, host in sorted(joined.items())) or "none"


def _serve_roll_call(layout: ProcessLayout, port: int, deadline: float) -> None:
    """Process 0: wait for processes 1..N-1, then release all or fail naming the missing."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind(("", port))
    except OSError as e:
        server.close()
        raise CadenzaError(f"process 0 cannot open the roll-call port {port}: {e}",
                           where=ENV_ROLLCALL_PORT,
                           fix="free the port or choose another coordinator port") from None
    server.listen(layout.num_processes)
    joined = {0: socket.gethostname()}
    conns, pending, problem = [], [], None
    try:
        while len(joined) < layout.num_processes and problem is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            readable, _, _ = select.select([server] + pending, [], [], min(remaining, 1.0))
            for sock in readable:
                if sock is server:
                    conn, _ = server.accept()
                    pending.append(conn)
                    continue
                pending.remove(sock)
                hello = _recv_line(sock, time.monotonic() + 5)
                if hello is None:
                    sock.close()
                    continue
                pid, host = int(hello["process_id"]), str(hello["host"])
                if hello["num_processes"] != layout.num_processes:
                    problem = (f"process {pid} on {host} expects {hello['num_processes']} "
                               f"processes, process 0 expects {layout.num_processes}")
                elif pid in joined:
                    problem = (f"process id {pid} joined twice (from {joined[pid]} and "
                               f"{host})")
                joined.setdefault(pid, host)
                conns.append(sock)
        missing = sorted(set(range(layout.num_processes)) - set(joined))
        if problem is None and missing:
            problem = (f"processes {', '.join(map(str, missing))} of {layout.num_processes} "
                       f"did not join within {layout.timeout_s} s (joined: {_describe(joined)})")
        reply = {"ok": True} if problem is None else {"error": problem}
        for conn in conns:
            try:
                _send(conn, reply)
            except OSError:
                pass
    finally:
        for conn in conns + pending:
            conn.close()
        server.close()
    if problem:
        raise CadenzaError(problem, where="multi-host start",
                           fix="start every process (check their logs and the launch "
                               f"command), or raise {ENV_INIT_TIMEOUT}")


def _answer_roll_call(layout: ProcessLayout, host: str, port: int, deadline: float) -> None:
    """Processes 1..N-1: report to process 0 and wait for its verdict."""
    hello = {"process_id": layout.process_id, "num_processes": layout.num_processes,
             "host": socket.gethostname()}
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=2)
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise CadenzaError(
                    f"process {layout.process_id} could not reach process 0 (roll call at "
                    f"{host}:{port}) within {layout.timeout_s} s", where="multi-host start",
                    fix=f"start process 0, or check {ENV_COORDINATOR}="
                        f"{layout.coordinator}") from None
            time.sleep(0.25)
    with conn:
        _send(conn, hello)
        reply = _recv_line(conn, deadline + 10)
    if reply is None:
        raise CadenzaError(f"process 0 at {host}:{port} closed the roll call without an answer",
                           where="multi-host start", fix="see process 0's log")
    if "error" in reply:
        raise CadenzaError(reply["error"], where="multi-host start",
                           fix="start every process (check their logs and the launch "
                               f"command), or raise {ENV_INIT_TIMEOUT}")


def roll_call(layout: ProcessLayout, env=None) -> None:
    """Make sure all ``layout.num_processes`` processes are up before ``jax.distributed``.

    Blocks up to ``layout.timeout_s``. Raises CadenzaError naming the missing
    process ids (on every process that is up), duplicate ids, or an
    unreachable process 0. See the module docstring for the protocol.
    """
    host, port = layout.rollcall_address(env)
    deadline = time.monotonic() + layout.timeout_s
    if layout.process_id == 0:
        _serve_roll_call(layout, port, deadline)
    else:
        _answer_roll_call(layout, host, port, deadline)


def initialize(env=None, *, auto_detect: bool = True) -> ProcessLayout:
    """Start the multi-host runtime if this is a multi-process job; set up logging.

    Call once, before any other JAX call. Single process: does nothing to JAX.
    Multi-process: roll call, then ``jax.distributed.initialize`` with the
    resolved layout. Returns the layout. Raises CadenzaError on the problems
    listed in :func:`resolve_layout` and :func:`roll_call`.
    """
    import jax

    layout = resolve_layout(env, auto_detect=auto_detect)
    setup_logging(layout.process_id, layout.num_processes)
    if layout.multi_process and not jax.distributed.is_initialized():
        log.info("waiting for %d processes (coordinator %s, layout from %s)",
                 layout.num_processes, layout.coordinator, layout.source)
        roll_call(layout, env)
        jax.distributed.initialize(
            layout.coordinator, layout.num_processes, layout.process_id,
            local_device_ids=list(layout.local_device_ids) if layout.local_device_ids else None,
            initialization_timeout=layout.timeout_s)
    return layout


def setup_logging(process_id: int, num_processes: int) -> None:
    """INFO and up from process 0, WARNING and up from the others, to stderr.

    Messages carry ``[process i/N]`` when there is more than one process.
    Idempotent: re-running replaces the handler it installed before.
    """
    prefix = f"[process {process_id}/{num_processes}] " if num_processes > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(prefix + "%(levelname)s %(name)s: %(message)s"))
    handler.set_name("cadenza-distributed")
    for old in [h for h in log.handlers if h.get_name() == "cadenza-distributed"]:
        log.removeHandler(old)
    log.addHandler(handler)
    log.setLevel(logging.INFO if process_id == 0 else logging.WARNING)
    log.propagate = False
