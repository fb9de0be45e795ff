"""The master's check client (``checker.Checker``) on a selector of its own, against real
loopback servers: what passes, what fails and why, the request it sends, timeouts."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from fastproxy.checker import Checker, Probe
from fastproxy.config import parse_config
from fastproxy.health import Change, HealthBoard


class OneShotServer:
    """Accepts connections on 127.0.0.1 and answers each with ``answer`` (None: never)."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        held = []
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            self.requests.append(data)
            if self.answer is None:
                held.append(conn)
                continue
            conn.sendall(self.answer)
            conn.close()
        for conn in held:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


@pytest.fixture
def servers() -> Iterator[list[OneShotServer]]:
    made: list[OneShotServer] = []
    yield made
    for server in made:
        server.stop()


def run_checks(port: int, **health: object) -> tuple[list[Change], HealthBoard]:
    """Two checks of one server (fall = 2, rise = 1) driven on a selector; their changes."""
    document = {
        "upstreams": {
            "u": {
                "servers": [f"127.0.0.1:{port}"],
                "health": {"interval_s": 0.2, "timeout_s": 0.2, "fall": 2, **health},
            }
        },
        "listeners": {"web": {"bind": "127.0.0.1:0", "policy": "p"}},
        "policies": {"p": {"fallback": "forward"}},
    }
    board = HealthBoard()
    board.sync(parse_config(document, "t.toml").upstreams, time.monotonic())
    selector = selectors.DefaultSelector()
    checker = Checker(board, selector)
    changes: list[Change] = []
    deadline = time.monotonic() + 10
    state = next(iter(board.servers.values()))
    try:
        while time.monotonic() < deadline and (state.passes + state.fails) < 2:
            changes += checker.tick(time.monotonic())
            for key, events in selector.select(0.05):
                assert isinstance(key.data, Probe)
                changes += checker.on_event(key.data, events, time.monotonic())
    finally:
        checker.close_all()
        selector.close()
    assert state.passes + state.fails >= 2, "two checks within 10 s"
    return changes, board


def test_checker_a_200_passes_and_the_request_is_a_plain_get(
    servers: list[OneShotServer],
) -> None:
    server = OneShotServer(b"HTTP/1.1 204 No Content\r\n\r\n")
    servers.append(server)
    changes, board = run_checks(server.port, path="/up?deep=1")
    assert changes == [] and board.table() == {"u": {f"127.0.0.1:{server.port}": True}}
    assert server.requests[0] == (
        b"GET /up?deep=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n"
        b"User-Agent: fastproxy\r\n\r\n" % server.port
    )


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"HTTP/1.1 500 Oops\r\n\r\n", "status 500"),
        (b"SSH-2.0-OpenSSH_9\r\n", "malformed status line"),
        (b"", "closed before a status line"),
        (None, "timed out"),
    ],
)
def test_checker_failures_mark_the_server_down_after_fall(
    servers: list[OneShotServer], answer: bytes | None, reason: str
) -> None:
    server = OneShotServer(answer)
    servers.append(server)
    changes, _ = run_checks(server.port)
    label = f"127.0.0.1:{server.port}"
    assert changes == [Change("u", label, False, f"2 checks failed: {reason}")]


def test_checker_a_refused_connect_fails() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        changes, _ = run_checks(port)
    assert changes == [
        Change("u", f"127.0.0.1:{port}", False, "2 checks failed: Connection refused")
    ]


def test_checker_custom_statuses() -> None:
    server = OneShotServer(b"HTTP/1.0 404 Not Found\r\n\r\n")
    try:
        changes, board = run_checks(server.port, statuses=[200, "400-404"])
    finally:
        server.stop()
    assert changes == [] and all(board.table()["u"].values())
