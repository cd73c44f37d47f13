"""Process layout from the environment and the roll call that names missing hosts."""

import socket
import threading

import pytest

from cadenza.errors import CadenzaError
from cadenza.train.distributed import ProcessLayout, initialize, resolve_layout, roll_call


def free_port_pair() -> int:
    """A port p with p and p+1 free (coordinator and roll call)."""
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


def env_for(pid: int, n: int, port: int, timeout: int = 20) -> dict:
    return {"CADENZA_COORDINATOR": f"127.0.0.1:{port}", "CADENZA_NUM_PROCESSES": str(n),
            "CADENZA_PROCESS_ID": str(pid), "CADENZA_INIT_TIMEOUT": str(timeout)}


def test_layout_from_env_and_single_default():
    layout = resolve_layout(env_for(1, 4, 9000), auto_detect=False)
    assert (layout.coordinator, layout.num_processes, layout.process_id, layout.source) == (
        "127.0.0.1:9000", 4, 1, "env")
    assert layout.rollcall_address({}) == ("127.0.0.1", 9001)
    assert layout.rollcall_address({"CADENZA_ROLLCALL_PORT": "7000"}) == ("127.0.0.1", 7000)
    single = resolve_layout({}, auto_detect=False)
    assert (single.num_processes, single.process_id, single.multi_process) == (1, 0, False)
    assert initialize({}, auto_detect=False).source == "single"


@pytest.mark.parametrize("env, message", [
    ({"CADENZA_PROCESS_ID": "1"}, "CADENZA_COORDINATOR, CADENZA_NUM_PROCESSES not set"),
    ({"CADENZA_COORDINATOR": "h:1", "CADENZA_NUM_PROCESSES": "2", "CADENZA_PROCESS_ID": "2"},
     "outside [0, 2)"),
    ({"CADENZA_COORDINATOR": "h", "CADENZA_NUM_PROCESSES": "2", "CADENZA_PROCESS_ID": "0"},
     "has no port"),
    ({"CADENZA_COORDINATOR": "h:1", "CADENZA_NUM_PROCESSES": "two", "CADENZA_PROCESS_ID": "0"},
     "not an integer"),
])
def test_bad_layouts_are_user_errors(env, message):
    with pytest.raises(CadenzaError, match=message.replace("[", r"\[").replace(")", r"\)")):
        resolve_layout(env, auto_detect=False)


def run_roll_call(layouts):
    """Roll call for several layouts in threads; returns {process_id: error text or None}."""
    results = {}

    def one(layout):
        try:
            roll_call(layout, env={})
            results[layout.process_id] = None
        except CadenzaError as e:
            results[layout.process_id] = str(e)

    threads = [threading.Thread(target=one, args=(lay,)) for lay in layouts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def layout(pid, n, port, timeout=20):
    return ProcessLayout(f"127.0.0.1:{port}", n, pid, "env", timeout_s=timeout)


def test_roll_call_passes_when_all_join():
    port = free_port_pair()
    assert run_roll_call([layout(i, 3, port) for i in (2, 0, 1)]) == {0: None, 1: None, 2: None}


def test_roll_call_names_the_missing_processes_on_every_host():
    port = free_port_pair()
    results = run_roll_call([layout(0, 4, port, timeout=2), layout(2, 4, port, timeout=2)])
    for pid in (0, 2):
        assert "processes 1, 3 of 4 did not join within 2 s" in results[pid]
        assert "joined: 0 (" in results[pid] and "2 (" in results[pid]


def test_missing_host_through_initialize_gives_a_message_not_a_hang():
    port = free_port_pair()
    with pytest.raises(CadenzaError, match="processes 1 of 2 did not join within 2 s"):
        initialize(env_for(0, 2, port, timeout=2), auto_detect=False)


def test_roll_call_without_process_0_names_the_coordinator():
    port = free_port_pair()
    results = run_roll_call([layout(1, 2, port, timeout=2)])
    assert f"could not reach process 0 (roll call at 127.0.0.1:{port + 1})" in results[1]


def test_roll_call_catches_duplicate_ids_and_count_mismatch():
    port = free_port_pair()
    results = run_roll_call([layout(0, 3, port), layout(1, 3, port), layout(1, 3, port)])
    assert "process id 1 joined twice" in results[0]
    port = free_port_pair()
    results = run_roll_call([layout(0, 2, port), layout(1, 3, port)])
    assert "process 1 on" in results[0] and "expects 3 processes" in results[0]
    assert results[1] == results[0]
