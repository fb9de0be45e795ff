"""The proxy's life cycle end to end (SPEC 8): a killed worker is respawned while traffic goes on,
and SIGTERM / SIGINT drain: in-flight requests finish, idle keep-alives close, WebSockets get a
close 1001, the master exits 0 and leaves no worker behind.

Workers are found as the master's children in ``/proc``; only the master started by the test and
the workers it forked are signalled, by pid. Every wait polls with a generous deadline and nothing
asserts how fast something happened.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.client import (
    LOOPBACK,
    HttpConnection,
    WebSocketClient,
    WebSocketClosedError,
    build_request,
    get,
    host_of,
)
from support.proxy import ProxyFactory, RunningProxy
from support.upstream import RecordingUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

WAIT_S = 25.0
POLL_S = 0.05


# -- processes ------------------------------------------------------------------------------------


def _state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from ``/proc/<pid>/stat``, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) S ...": comm may contain spaces and parentheses, the state follows the last ")"
    return stat.rpartition(")")[2].split()[0]


def is_running(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    state = _state(pid)
    return state is not None and state != "Z"


def worker_pids(proxy: RunningProxy) -> set[int]:
    """The master's running children: its workers (the master forks nothing else)."""
    try:
        text = Path(f"/proc/{proxy.pid}/task/{proxy.pid}/children").read_text()
    except OSError:
        return set()
    return {pid for pid in map(int, text.split()) if is_running(pid)}


def is_proxy_process(proxy: RunningProxy, pid: int) -> bool:
    """``pid`` is running and is a process of this proxy (a worker has the master's argv)."""
    if not is_running(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(proxy.config_path).encode() in cmdline


def wait_until(
    what: str, predicate: Callable[[], bool], proxy: RunningProxy, timeout: float = WAIT_S
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{proxy.output()}")
        time.sleep(POLL_S)


def wait_workers(proxy: RunningProxy, count: int) -> set[int]:
    wait_until(f"{count} workers", lambda: len(worker_pids(proxy)) == count, proxy)
    return worker_pids(proxy)


def wait_exit(proxy: RunningProxy, timeout: float = WAIT_S) -> int:
    try:
        return proxy.process.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the master did not exit within {timeout} s\n{proxy.output()}")


def assert_refused(port: int) -> None:
    """Nothing listens on ``port`` any more: a connect is refused."""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, port), timeout=5.0).close()


def assert_served(port: int, label: str, count: int) -> None:
    """``count`` requests, each on a new connection, all answered 200 by the upstream."""
    for index in range(count):
        target = f"/api/1/devices/{label}-{index}"
        response = get(port, target)
        assert response.status == 200, (target, response.status, response.body[:300])
        assert response.json()["target"] == target


# -- respawn --------------------------------------------------------------------------------------


def test_worker_killed_is_respawned_and_requests_keep_succeeding(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    running = proxy(overrides={"workers": 2})
    port = running.sdk_port
    before = wait_workers(running, 2)
    assert_served(port, "before", 6)

    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    # a zombie has released its sockets: from here on only live workers can accept
    wait_until("the killed worker to die", lambda: not is_running(victim), running)
    assert_served(port, "right-after", 6)

    wait_until(
        "a respawned worker",
        lambda: len(worker_pids(running)) == 2 and victim not in worker_pids(running),
        running,
    )
    after = worker_pids(running)
    [respawned] = after - before
    assert after == (before - {victim}) | {respawned}
    assert_served(port, "after-respawn", 10)
    assert running.alive()
    assert is_proxy_process(running, respawned)
    assert f"worker {victim} killed by SIGKILL" in running.output()


# -- graceful stop --------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_signal_completes_in_flight_request_and_exits_0(
    proxy: ProxyFactory, upstream: RecordingUpstream, signum: signal.Signals
) -> None:
    running = proxy(first_byte_timeout_s=20.0, overrides={"workers": 2, "graceful_timeout_s": 15.0})
    port = running.sdk_port
    workers = wait_workers(running, 2)
    target = "/api/1/devices/x?delay=2"
    with HttpConnection(port, timeout=WAIT_S) as conn:
        conn.send(build_request(target, host=host_of(port)))
        # the upstream has the whole request and is waiting 2 s before it answers
        wait_until("the request upstream", lambda: bool(upstream.find(target.encode())), running)
        running.process.send_signal(signum)
        response = conn.read_response()
        assert response.status == 200, (response.status, response.body[:300])
        assert response.json()["target"] == target
        assert conn.wait_closed(WAIT_S), "a drained connection is closed after its response"
    assert wait_exit(running) == 0
    assert not [pid for pid in workers if is_proxy_process(running, pid)]
    assert_refused(port)
    assert_refused(running.admin_port)


def test_shutdown_closes_idle_keepalive_connection(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    # the drain deadline is far beyond the wait below: only the drain itself can close it in time
    running = proxy(overrides={"graceful_timeout_s": 60.0})
    port = running.sdk_port
    workers = wait_workers(running, 1)
    with HttpConnection(port, timeout=WAIT_S) as conn:
        assert conn.get("/api/1/devices/x").status == 200
        running.process.send_signal(signal.SIGTERM)
        # an orderly close (FIN, not a reset) and no response of any kind (a 408, say)
        assert conn.sock.recv(65536) == b""
    assert wait_exit(running) == 0
    assert not [pid for pid in workers if is_proxy_process(running, pid)]
    assert_refused(port)


def test_shutdown_closes_websocket_with_1001(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    running = proxy(overrides={"graceful_timeout_s": 5.0})
    workers = wait_workers(running, 1)
    with WebSocketClient(running.sdk_port, "/sockets/1/x", timeout=WAIT_S) as ws:
        ws.send_text("before")
        assert ws.recv() == "before"
        running.process.send_signal(signal.SIGTERM)
        with pytest.raises(WebSocketClosedError) as closed:
            ws.recv()
    assert closed.value.code == 1001
    assert wait_exit(running) == 0
    assert not [pid for pid in workers if is_proxy_process(running, pid)]
