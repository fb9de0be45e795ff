"""SIGTERM as an edge service needs it (SPEC 8): no request sent is left unanswered, WebSockets
run until the drain deadline and then get Close 1001 in both modes, the workers finish their
own drain before the master's last resort, and /readyz says 503 meanwhile.

Counts, not timings; every wait has a generous bound. The parser cannot matter here.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.client import (
    ConnectionClosedError,
    HttpConnection,
    WebSocketClient,
    WebSocketClosedError,
    build_request,
    get,
    host_of,
)
from support.proxy import REPO_ROOT, ProxyFactory, RunningProxy, free_port

pytestmark = pytest.mark.e2e

WAIT_S = 30.0


def _wait_exit(proxy: RunningProxy, timeout: float = 60.0) -> int:
    return proxy.process.wait(timeout=timeout)


def test_drain_answers_every_request_sent_under_keepalive_load(factory: ProxyFactory) -> None:
    proxy = factory(overrides={"workers": 2, "graceful_timeout_s": 20.0})
    port = proxy.sdk_port
    request = build_request("/api/1/devices/x", host=host_of(port))
    # "unanswered": a request sent on a connection that had already been answered (reused)
    # and then got no answer: what the drain must never do. A new connection can still race
    # the closing listener (the kernel completed its handshake, the listening socket closed
    # before any worker accepted it): that is "cut_new", as with every proxy, not counted.
    counts = {"answered": 0, "unanswered": 0, "closing": 0, "cut_new": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                conn = HttpConnection(port, timeout=WAIT_S)
            except OSError:
                return  # the listener is closed: the drain has begun
            with conn:
                for served in range(10_000):
                    if stop.is_set():
                        return
                    try:
                        conn.send(request)
                    except OSError:
                        break  # closed before this request was written: never sent
                    try:
                        response = conn.read_response()
                    except (ConnectionClosedError, OSError):
                        with lock:
                            counts["unanswered" if served else "cut_new"] += 1
                        break
                    with lock:
                        counts["answered"] += 1
                    if (response.header("connection") or b"").lower() == b"close":
                        with lock:
                            counts["closing"] += 1
                        break

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    proxy.process.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=WAIT_S)
    assert _wait_exit(proxy) == 0
    assert counts["answered"] > 0
    assert counts["closing"] > 0, counts  # the drain ended busy connections with an answer
    assert counts["unanswered"] == 0, counts


@pytest.mark.parametrize("mode", ["validate", "tunnel"])
def test_drain_lets_websockets_run_then_closes_them_with_1001(
    factory: ProxyFactory, mode: str
) -> None:
    proxy = factory(
        overrides={"graceful_timeout_s": 6.0, "listeners": {"sdk": {"websocket_mode": mode}}}
    )
    with WebSocketClient(proxy.sdk_port, "/sockets/1/x", timeout=WAIT_S) as ws:
        ws.send_text("before")
        assert ws.recv() == "before"
        signalled = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # still open while the drain goes on; the load balancer sees the drain
        ws.send_text("during")
        assert ws.recv() == "during"
        ready = get(proxy.admin_port, "/readyz")
        assert (ready.status, ready.json()) == (503, {"ready": False, "reason": "draining"})
        with pytest.raises(WebSocketClosedError) as closed:
            while True:
                ws.recv()
    assert closed.value.code == 1001
    assert time.monotonic() - signalled >= 1.0  # not at once: at the WebSocket deadline
    assert _wait_exit(proxy) == 0


def test_drain_answers_a_request_still_running_at_the_deadline(factory: ProxyFactory) -> None:
    proxy = factory(first_byte_timeout_s=30.0, overrides={"graceful_timeout_s": 2.0})
    port = proxy.sdk_port
    with HttpConnection(port, timeout=WAIT_S) as conn:
        conn.send(build_request("/api/1/devices/x?delay=20", host=host_of(port)))
        time.sleep(0.5)  # at the upstream, which answers in 20 s
        proxy.process.send_signal(signal.SIGTERM)
        response = conn.read_response()
    # the worker's own answer, not an empty reply after the master's SIGKILL
    assert response.status == 503
    assert response.json()["error"] == "shutting_down"
    assert _wait_exit(proxy) == 0
    assert "killing them" not in proxy.output()


def test_ctrl_c_during_start_up_stops_cleanly(tmp_path: Path) -> None:
    """Ctrl-C as soon as the master says anything (it is binding, its signal handlers are not
    in place yet), and a moment later: a clean stop either way, exit 0, no traceback. (Before
    the interpreter has started, a signal ends any Python program; no test can aim there.)"""
    for delay in (0.0, 0.05, 0.2):
        port = free_port()
        config = tmp_path / f"c{port}.toml"
        config.write_text(
            f'[upstreams.u]\nservers = ["127.0.0.1:9"]\n[listeners.sdk]\n'
            f'bind = "127.0.0.1:{port}"\npolicy = "cobrowse-sdk"\n[admin]\n'
            f'bind = "127.0.0.1:{free_port()}"\n'
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "fastproxy", "run", "-c", str(config)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stderr is not None
        first = process.stderr.readline()  # the first log line: the master is starting
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _out, rest = process.communicate(timeout=WAIT_S)
        err = (first + rest).decode(errors="replace")
        assert "Traceback" not in err, (delay, err)
        assert process.returncode == 0, (delay, err)
