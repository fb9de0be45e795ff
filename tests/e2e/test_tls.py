"""TLS end to end (SPEC 3): termination on listeners, SNI, reload of certificates, handshake
limits, and TLS to upstreams; with real clients (Python ``ssl``, ``curl``, ``openssl s_client``)
and certificates made at test time (``support.certs``).

TLS is I/O below the parser: these proxies run on the default parser only (``factory``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.certs import Authority, Pair, san_names
from support.client import (
    HttpConnection,
    WebSocketClient,
    WebSocketClosedError,
    build_request,
    host_of,
)
from support.proxy import ProxyFactory, RunningProxy, free_port
from support.spec import SPEC_EXAMPLE
from support.upstream import RecordingUpstream

TOOL_TIMEOUT_S = 20.0


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority(tmp_path / "certs")


def tls_proxy(
    factory: ProxyFactory,
    pair: Pair,
    *,
    tls: dict[str, object] | None = None,
    sdk: dict[str, object] | None = None,
    agent_tls: bool = False,
    servers: list[str] | None = None,
    upstream_tls: object = None,
) -> RunningProxy:
    """A proxy whose ``sdk`` listener (and ``agent``, with ``agent_tls``) terminates TLS."""
    table: dict[str, object] = {**pair.table(), **(tls or {})}
    listeners: dict[str, object] = {"sdk": {"tls": table, **(sdk or {})}}
    if agent_tls:
        listeners["agent"] = {"tls": table}
    overrides: dict[str, object] = {"listeners": listeners}
    if upstream_tls is not None:
        overrides["upstreams"] = {"cobrowse": {"tls": upstream_tls}}
    return factory(servers=servers, overrides=overrides)


def client(ca: Authority, **options: object) -> ssl.SSLContext:
    context = ca.client_context()
    for name, value in options.items():
        setattr(context, name, value)
    return context


def https(
    port: int, ca: Authority, target: str = "/api/1/devices", server_name: str = "sdk.example"
) -> HttpConnection:
    return HttpConnection(port, tls=ca.client_context(), server_name=server_name)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """Read until the peer closes: (closed within ``timeout``, what was read)."""
    sock.settimeout(timeout)
    received = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return False, bytes(received)
        except ConnectionResetError:
            return True, bytes(received)
        if not data:
            return True, bytes(received)
        received += data
    return False, bytes(received)


# -- the SPEC 3 example ---------------------------------------------------------------------------


def spec_example(directory: Path, pair: Pair) -> str:
    """The SPEC text with only the certificate and key paths pointing into ``directory``."""
    text = SPEC_EXAMPLE.replace("/etc/fastproxy/tls.crt", str(pair.cert))
    return text.replace("/etc/fastproxy/tls.key", str(pair.key))


def test_tls_spec_example_passes_check(ca: Authority, tmp_path: Path) -> None:
    path = tmp_path / "fastproxy.toml"
    path.write_text(spec_example(tmp_path, ca.issue("sdk.example")))
    result = subprocess.run(
        [sys.executable, "-m", "fastproxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert (result.returncode, result.stdout) == (0, f"{path}: ok (2 listeners, 1 upstream)\n")


def test_tls_spec_example_serves_https_with_curl(
    upstream: RecordingUpstream, ca: Authority, tmp_path: Path
) -> None:
    # Run: the example's addresses are this host's loopback (10.1.0.2 and the 10.0.0.x servers
    # are not here); everything else, TLS included, is the text as written.
    sdk_port, agent_port, admin_port = free_port(), free_port(), free_port()
    text = spec_example(tmp_path, ca.issue("sdk.example"))
    text = text.replace('"0.0.0.0:8443"', f'"127.0.0.1:{sdk_port}"')
    text = text.replace('"10.1.0.2:8080"', f'"127.0.0.1:{agent_port}"')
    text = text.replace('"127.0.0.1:9901"', f'"127.0.0.1:{admin_port}"')
    text = text.replace('["10.0.0.5:8080", "10.0.0.6:8080"]', f'["{upstream.address}"]')
    path = tmp_path / "spec.toml"
    path.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics-spec")
    os.makedirs(env["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    with (tmp_path / "spec.err").open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "fastproxy", "run", "-c", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            env=env,
            cwd=tmp_path,
        )
    try:
        result = None
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            result = subprocess.run(
                [
                    "curl",
                    "-sS",
                    "--cacert",
                    str(ca.ca_file),
                    "--resolve",
                    f"sdk.example:{sdk_port}:127.0.0.1",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{http_version} %{ssl_verify_result}",
                    f"https://sdk.example:{sdk_port}/api/1/devices?x=1",
                ],
                capture_output=True,
                text=True,
                timeout=TOOL_TIMEOUT_S,
            )
            if result.returncode == 0:
                break
            time.sleep(0.2)
        assert result is not None and result.returncode == 0, (
            result,
            (tmp_path / "spec.err").read_text(),
        )
        # curl offers h2 too: the proxy's ALPN answers http/1.1
        assert result.stdout == "200 1.1 0"
        forwarded = upstream.find(b"/api/1/devices?x=1")
        assert [r.header("x-forwarded-proto") for r in forwarded] == [b"https"]
        # the agent listener of the example stays plain HTTP
        with HttpConnection(agent_port) as conn:
            assert conn.get("/api/1/x").status == 200
    finally:
        process.terminate()
        process.wait(TOOL_TIMEOUT_S)


@contextlib.contextmanager
def tls_backend(context: ssl.SSLContext, factory: ProxyFactory) -> Iterator[RecordingUpstream]:
    """A recording upstream speaking TLS. The proxies stop first: a connection whose handshake
    is under way when the backend's loop closes would be left unclosed (the server tracks
    connections only once their handshake is done)."""
    backend = RecordingUpstream(ssl_context=context)
    backend.start()
    try:
        yield backend
    finally:
        factory.stop_all()
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not all(c.closed for c in backend.connections()):
            time.sleep(0.05)
        time.sleep(0.2)  # the proxies' sockets are gone; the backend's loop closes the rest
        backend.stop()
    assert not backend.errors


# -- termination ----------------------------------------------------------------------------------


def test_tls_sni_chooses_the_certificate(factory: ProxyFactory, ca: Authority) -> None:
    default = ca.issue("sdk.example")
    other = ca.issue("other.example")
    wild = ca.issue("*.apps.example")
    proxy = tls_proxy(factory, default, tls={"certificates": [other.table(), wild.table()]})
    port = proxy.sdk_port
    for name, expected in [
        ("sdk.example", ["sdk.example"]),
        ("other.example", ["other.example"]),
        ("x.apps.example", ["*.apps.example"]),
    ]:
        with HttpConnection(port, tls=ca.client_context(), server_name=name) as conn:
            assert isinstance(conn.sock, ssl.SSLSocket)
            assert san_names(conn.sock) == expected
            assert conn.sock.selected_alpn_protocol() == "http/1.1"
            assert conn.get("/api/1/devices").status == 200
    # no SNI, or a name no certificate holds: the default one
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-noservername"],
        input=b"",
        capture_output=True,
        timeout=TOOL_TIMEOUT_S,
    )
    subject = subprocess.run(
        ["openssl", "x509", "-in", str(default.cert), "-noout", "-subject"],
        capture_output=True,
        check=True,
        timeout=TOOL_TIMEOUT_S,
    ).stdout.strip()
    assert subject.startswith(b"subject=") and b"Testing cert" in subject
    assert subject in result.stdout
    other_subject = subprocess.run(
        ["openssl", "x509", "-in", str(other.cert), "-noout", "-subject"],
        capture_output=True,
        check=True,
        timeout=TOOL_TIMEOUT_S,
    ).stdout.strip()
    assert other_subject not in result.stdout
    no_sni = client(ca, check_hostname=False)
    with HttpConnection(port, tls=no_sni, server_name=None) as conn:
        assert isinstance(conn.sock, ssl.SSLSocket)
        assert san_names(conn.sock) == ["sdk.example"]
    unknown = client(ca, check_hostname=False)
    with HttpConnection(port, tls=unknown, server_name="unknown.example") as conn:
        assert isinstance(conn.sock, ssl.SSLSocket)
        assert san_names(conn.sock) == ["sdk.example"]


def test_tls_old_versions_refused(factory: ProxyFactory, ca: Authority) -> None:
    proxy = tls_proxy(factory, ca.issue("sdk.example"))
    port = proxy.sdk_port
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        old = ca.client_context()
        old.set_ciphers("ALL:@SECLEVEL=0")
        with warnings.catch_warnings():  # the ssl module deprecates what this test must try
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = version
            old.maximum_version = version
        with pytest.raises(ssl.SSLError):
            HttpConnection(port, tls=old, server_name="sdk.example").close()
    tls12 = client(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    with HttpConnection(port, tls=tls12, server_name="sdk.example") as conn:
        assert isinstance(conn.sock, ssl.SSLSocket)
        assert conn.sock.version() == "TLSv1.2"
        cipher = conn.sock.cipher()
        assert cipher is not None and cipher[0].startswith("ECDHE-")
        assert conn.get("/api/1/devices").status == 200
    # openssl s_client, TLS 1.1: refused whatever the local OpenSSL still allows itself
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            "sdk.example",
            "-tls1_1",
            "-cipher",
            "ALL:@SECLEVEL=0",
        ],
        input=b"",
        capture_output=True,
        timeout=TOOL_TIMEOUT_S,
    )
    assert result.returncode != 0
    assert b"Cipher is (NONE)" in result.stdout or b"alert" in result.stderr


def test_tls_min_version_13_refuses_12(factory: ProxyFactory, ca: Authority) -> None:
    proxy = tls_proxy(factory, ca.issue("sdk.example"), tls={"min_version": "1.3"})
    with pytest.raises(ssl.SSLError):
        HttpConnection(
            proxy.sdk_port,
            tls=client(ca, maximum_version=ssl.TLSVersion.TLSv1_2),
            server_name="sdk.example",
        ).close()
    with https(proxy.sdk_port, ca) as conn:
        assert isinstance(conn.sock, ssl.SSLSocket)
        assert conn.sock.version() == "TLSv1.3"


def test_tls_forwarding_fields_and_host_check_say_https(
    factory: ProxyFactory, upstream: RecordingUpstream, ca: Authority
) -> None:
    proxy = tls_proxy(factory, ca.issue("sdk.example"), sdk={"forwarded_header": True})
    with https(proxy.sdk_port, ca) as conn:
        assert conn.get("/api/1/devices?proto").status == 200
        # absolute-form: the default port of https is 443
        raw = build_request("https://sdk.example/api/1/devices?abs", host="sdk.example:443")
        assert conn.request(raw).status == 200
        raw = build_request("https://sdk.example/api/1/devices?abs80", host="sdk.example:80")
        assert conn.request(raw).status == 400
    (request,) = upstream.find(b"/api/1/devices?proto")
    assert request.header("x-forwarded-proto") == b"https"
    forwarded = request.header("forwarded")
    assert forwarded is not None and b"proto=https" in forwarded
    assert len(upstream.find(b"/api/1/devices?abs")) == 1
    assert not upstream.find(b"/api/1/devices?abs80")


def test_tls_websocket_on_both_listeners_to_a_tls_upstream(
    factory: ProxyFactory, ca: Authority
) -> None:
    with tls_backend(ca.server_context("backend.example"), factory) as backend:
        proxy = tls_proxy(
            factory,
            ca.issue("sdk.example"),
            agent_tls=True,
            servers=[backend.address],
            upstream_tls={"ca": str(ca.ca_file), "server_name": "backend.example"},
        )
        for port in (proxy.sdk_port, proxy.agent_port):
            with WebSocketClient(
                port, "/sockets/1/tls", tls=ca.client_context(), server_name="sdk.example"
            ) as ws:
                for message in ("hello", "x" * 100_000):
                    ws.send_text(message)
                    assert ws.recv() == message
                ws.send_bytes(b"\x00\x01")
                assert ws.recv() == b"\x00\x01"
                assert ws.close() == 1000
        assert sum(len(c.ws_messages) for c in backend.connections()) == 6


# -- reload ---------------------------------------------------------------------------------------


def test_tls_reload_swaps_the_certificate_and_keeps_connections(
    factory: ProxyFactory, ca: Authority
) -> None:
    first = ca.issue("sdk.example")
    proxy = tls_proxy(factory, first)
    port = proxy.sdk_port
    old = https(port, ca)
    ws = WebSocketClient(port, "/sockets/1/r", tls=ca.client_context(), server_name="sdk.example")
    try:
        assert isinstance(old.sock, ssl.SSLSocket)
        assert san_names(old.sock) == ["sdk.example"]
        assert old.get("/api/1/devices?before").status == 200
        # the same paths, new contents: a renewed certificate with one more name
        renewed = ca.issue("sdk.example", "renewed.example")
        os.replace(renewed.cert, first.cert)
        os.replace(renewed.key, first.key)
        proxy.reload(proxy.document)
        proxy.wait_for_message("generation 2 applied by every worker")
        with https(port, ca) as new:
            assert isinstance(new.sock, ssl.SSLSocket)
            assert san_names(new.sock) == ["sdk.example", "renewed.example"]
            assert new.get("/api/1/devices?new").status == 200
        assert old.get("/api/1/devices?after").status == 200
        assert san_names(old.sock) == ["sdk.example"]
        ws.send_text("still here")
        assert ws.recv() == "still here"
        # a key that does not match: the reload fails, the current certificate keeps serving
        other = ca.issue("other.example")
        os.replace(other.key, first.key)
        proxy.reload(proxy.document)
        proxy.wait_for_message("reload failed, still serving generation 2")
        assert any(
            f'listeners.sdk.tls.key: the key does not match the certificate "{first.cert}"' in m
            for m in proxy.messages()
        )
        with https(port, ca) as new:
            assert isinstance(new.sock, ssl.SSLSocket)
            assert san_names(new.sock) == ["sdk.example", "renewed.example"]
            assert new.get("/api/1/devices?still").status == 200
        ws.send_text("and still")
        assert ws.recv() == "and still"
        assert old.get("/api/1/devices?last").status == 200
    finally:
        old.close()
        ws.sock.close()


# -- hostile clients ------------------------------------------------------------------------------


def test_tls_plaintext_and_garbage_are_closed_and_disturb_no_one(
    factory: ProxyFactory, ca: Authority
) -> None:
    proxy = tls_proxy(factory, ca.issue("sdk.example"))
    port = proxy.sdk_port
    bad = [
        build_request("/api/1/devices", host=host_of(port)),
        b"\x16\x03\x01\x00\x05garbage-and-more-garbage" * 40,
        os.urandom(4096),
    ]
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=10.0) for _ in bad]
    try:
        for sock, data in zip(sockets, bad, strict=True):
            sock.sendall(data)
        # meanwhile a TLS client is answered
        started = time.monotonic()
        with https(port, ca) as conn:
            assert conn.get("/api/1/devices").status == 200
        assert time.monotonic() - started < 10.0
        for sock in sockets:
            closed, received = read_until_closed(sock, 10.0)
            assert closed
            assert b"HTTP/1.1" not in received
    finally:
        for sock in sockets:
            sock.close()


def test_tls_undecodable_server_names_fail_quietly(factory: ProxyFactory, ca: Authority) -> None:
    # two certificates: the name is looked at (with one, there is nothing to choose and the
    # default certificate serves any name, as nginx does)
    other = ca.issue("other.example")
    proxy = tls_proxy(factory, ca.issue("sdk.example"), tls={"certificates": [other.table()]})
    port = proxy.sdk_port
    for name in (b"a\xffb.example", "caf\u00e9.example".encode()):
        result = subprocess.run(
            [b"openssl", b"s_client", b"-connect", b"127.0.0.1:%d" % port, b"-servername", name],
            input=b"",
            capture_output=True,
            timeout=TOOL_TIMEOUT_S,
        )
        assert b"Cipher is (NONE)" in result.stdout or result.returncode != 0
    # the server answers the next client, and wrote no traceback per refused name
    with https(port, ca) as conn:
        assert conn.get("/api/1/devices").status == 200
    stderr = proxy.stderr_path.read_text(errors="replace")
    assert "Exception ignored" not in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("limit", ["max_connections_per_client", "max_connections"])
def test_tls_unfinished_handshakes_time_out_and_count_against_the_limits(
    factory: ProxyFactory, ca: Authority, limit: str
) -> None:
    proxy = tls_proxy(
        factory,
        ca.issue("sdk.example"),
        tls={"handshake_timeout_s": 2.0},
        sdk={"limits": {limit: 3}},
    )
    port = proxy.sdk_port
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10.0) for _ in range(3)]
    try:
        started = time.monotonic()
        time.sleep(0.3)  # accepted by the worker
        # the cap of 3 is full of handshakes: a 4th connection is closed
        with pytest.raises((ssl.SSLError, OSError)):
            https(port, ca).close()
        # the silent ones are closed after the handshake timeout, not before
        for sock in silent:
            closed, received = read_until_closed(sock, 15.0)
            assert closed and received == b""
        elapsed = time.monotonic() - started
        assert elapsed >= 1.5
        # and the address may connect again
        with https(port, ca) as conn:
            assert conn.get("/api/1/devices").status == 200
    finally:
        for sock in silent:
            sock.close()


def test_tls_slow_handshakes_delay_no_one(factory: ProxyFactory, ca: Authority) -> None:
    proxy = tls_proxy(factory, ca.issue("sdk.example"))
    port = proxy.sdk_port
    # many connections that start a handshake and never finish it (half a ClientHello)
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(32)
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=10.0) for _ in range(50)]
    try:
        for sock in stalled:
            sock.sendall(hello)
        results: list[int] = []

        def one() -> None:
            with https(port, ca) as conn:
                results.append(conn.get("/api/1/devices").status)

        threads = [threading.Thread(target=one) for _ in range(5)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20.0)
        assert results == [200] * 5
        assert time.monotonic() - started < 10.0
    finally:
        for sock in stalled:
            sock.close()


# -- upstream TLS ---------------------------------------------------------------------------------


def test_tls_to_upstreams_verify_ca_server_name_and_client_cert(
    factory: ProxyFactory, ca: Authority
) -> None:
    server_context = ca.server_context("backend.example")
    with tls_backend(server_context, factory) as backend:
        proxy = factory(servers=[backend.address])
        document = proxy.document
        generation = 1

        def answer(upstream_tls: object) -> int:
            nonlocal generation
            # the requests' own handshakes are under test: no active checks (they would mark
            # the server down after a failed verification and every answer would be a 503)
            upstreams = {
                "cobrowse": {"servers": [backend.address], "tls": upstream_tls, "health": False}
            }
            proxy.reload({**document, "upstreams": upstreams})
            generation += 1
            proxy.wait_for_message(f"generation {generation} applied by every worker")
            with HttpConnection(proxy.sdk_port) as conn:
                return conn.get("/api/1/devices").status

        # verification is on by default, against the system store, which knows no trustme CA
        assert answer(True) == 502
        # the CA, but the name checked is the server's host, 127.0.0.1
        assert answer({"ca": str(ca.ca_file)}) == 502
        assert answer({"ca": str(ca.ca_file), "server_name": "backend.example"}) == 200
        assert answer({"verify": False}) == 200
        # a client certificate, asked for by the backend
        server_context.verify_mode = ssl.CERT_REQUIRED
        server_context.load_verify_locations(cafile=str(ca.ca_file))
        assert answer({"ca": str(ca.ca_file), "server_name": "backend.example"}) == 502
        client_pair = ca.issue("proxy.example")
        full = {"ca": str(ca.ca_file), "server_name": "backend.example", **client_pair.table()}
        assert answer(full) == 200


def test_tls_drain_closes_websockets_with_1001_and_exits(
    factory: ProxyFactory, ca: Authority
) -> None:
    pair = ca.issue("sdk.example")
    proxy = factory(
        overrides={"graceful_timeout_s": 4.0, "listeners": {"sdk": {"tls": pair.table()}}}
    )
    with (
        WebSocketClient(
            proxy.sdk_port, "/sockets/1/d", tls=ca.client_context(), server_name="sdk.example"
        ) as ws,
        https(proxy.sdk_port, ca) as idle,
    ):
        assert idle.get("/api/1/devices").status == 200
        ws.send_text("before")
        assert ws.recv() == "before"
        proxy.process.send_signal(signal.SIGTERM)
        # the idle keep-alive connection is closed, the WebSocket gets its Close 1001
        assert idle.wait_closed(10.0)
        with pytest.raises(WebSocketClosedError) as closed:
            while True:
                ws.recv()
        assert closed.value.code == 1001
    assert proxy.process.wait(20.0) == 0
