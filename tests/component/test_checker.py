"""The master's check client (``checker.Checker``) on a selector of its own, against real
loopback servers: what passes, what fails and why, the request it sends, timeouts; over TLS,
against a recording upstream with a trustme certificate (verified or not, the wrong CA, a
handshake that never ends, a plaintext server)."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.certs import Authority
from support.upstream import RecordingUpstream

from fastproxy import tls as tls_contexts
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


def run_checks(port: int, tls: object = None, **health: object) -> tuple[list[Change], HealthBoard]:
    """Two checks of one server (fall = 2, rise = 1) driven on a selector; their changes.
    ``tls``: the upstream's ``tls`` setting, its client context built as the master does."""
    upstream: dict[str, object] = {
        "servers": [f"127.0.0.1:{port}"],
        "health": {"interval_s": 0.2, "timeout_s": 0.2, "fall": 2, **health},
    }
    if tls is not None:
        upstream["tls"] = tls
    document = {
        "upstreams": {"u": upstream},
        "listeners": {"web": {"bind": "127.0.0.1:0", "policy": "p"}},
        "policies": {"p": {"fallback": "forward"}},
    }
    config = parse_config(document, "t.toml")
    board = HealthBoard()
    board.sync(config.upstreams, time.monotonic())
    selector = selectors.DefaultSelector()
    checker = Checker(board, selector)
    checker.use_tls(tls_contexts.build(config).upstreams)
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


# -- over TLS -------------------------------------------------------------------------------------


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority(tmp_path / "certs")


@pytest.fixture
def tls_server(ca: Authority) -> Iterator[RecordingUpstream]:
    """A recording upstream speaking TLS with a certificate for ``backend.example``."""
    server = RecordingUpstream(ssl_context=ca.server_context("backend.example"))
    server.start()
    try:
        yield server
    finally:
        # the checks closed their connections; give the server's loop time to see it
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not all(c.closed for c in server.connections()):
            time.sleep(0.05)
        server.stop()
    assert not server.errors, server.errors


def test_checker_tls_with_the_right_ca_passes_and_sends_the_server_name(
    tls_server: RecordingUpstream, ca: Authority
) -> None:
    changes, board = run_checks(
        tls_server.port, tls={"ca": str(ca.ca_file), "server_name": "backend.example"}
    )
    assert changes == [] and board.table() == {"u": {tls_server.address: True}}
    state = board.servers[("u", tls_server.address)]
    assert (state.passes, state.fails) == (2, 0)
    checks = tls_server.requests(include_health=True)
    assert len(checks) == 2 and all(r.target == b"/up" for r in checks)
    assert checks[0].header("Host") == b"backend.example:%d" % tls_server.port


def test_checker_tls_with_another_ca_fails_on_verification(
    tls_server: RecordingUpstream, tmp_path: Path
) -> None:
    other = Authority(tmp_path / "other")
    changes, _ = run_checks(
        tls_server.port, tls={"ca": str(other.ca_file), "server_name": "backend.example"}
    )
    assert changes == [
        Change(
            "u",
            tls_server.address,
            False,
            "2 checks failed: TLS: certificate verify failed: unable to get local issuer "
            "certificate",
        )
    ]
    assert tls_server.requests(include_health=True) == []


def test_checker_tls_checks_the_name_of_the_server(
    tls_server: RecordingUpstream, ca: Authority
) -> None:
    # no server_name: the name checked is the server's host, 127.0.0.1, not in the certificate
    changes, _ = run_checks(tls_server.port, tls={"ca": str(ca.ca_file)})
    (change,) = changes
    assert not change.up
    assert change.reason.startswith("2 checks failed: TLS: certificate verify failed: ")
    assert "127.0.0.1" in change.reason


def test_checker_tls_without_verification_passes(tls_server: RecordingUpstream) -> None:
    changes, board = run_checks(tls_server.port, tls={"verify": False})
    assert changes == [] and board.table() == {"u": {tls_server.address: True}}
    checks = tls_server.requests(include_health=True)
    assert len(checks) == 2
    assert checks[0].header("Host") == tls_server.address.encode()


def test_checker_tls_status_is_judged_as_over_plain_http(
    tls_server: RecordingUpstream, ca: Authority
) -> None:
    tls = {"ca": str(ca.ca_file), "server_name": "backend.example"}
    changes, _ = run_checks(tls_server.port, tls=tls, path="/up?status=503")
    assert changes == [Change("u", tls_server.address, False, "2 checks failed: status 503")]


def test_checker_tls_handshake_that_never_ends_times_out() -> None:
    # listening, never accepting: the kernel completes the TCP handshake, nobody answers TLS
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        changes, _ = run_checks(port, tls={"verify": False})
    assert changes == [
        Change("u", f"127.0.0.1:{port}", False, "2 checks failed: timed out in the TLS handshake")
    ]


def test_checker_tls_to_a_plaintext_server_fails(upstream: RecordingUpstream) -> None:
    changes, _ = run_checks(upstream.port, tls={"verify": False})
    (change,) = changes
    assert not change.up
    assert change.reason.startswith("2 checks failed: TLS: "), change.reason
    assert upstream.requests(include_health=True) == []
