"""The access log configured in the file (SPEC 9): ``[access_log]`` path, ``sample`` and
``query``; the fields of a record (bytes, upstream server and response time, TLS, generation,
user agent, reasons of 502 and 504); SIGUSR1 reopen; reload switching it on and off; the
``--access-log`` flag winning over the file; and the journald priority prefix on stderr.

Each test starts a real proxy process in front of a real upstream on loopback. Records are
buffered up to a second in each worker: waits poll with generous deadlines.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.certs import Authority
from support.client import HttpConnection, build_request, get, host_of
from support.proxy import ProxyFactory, RunningProxy, free_port
from support.upstream import RecordingUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

WAIT_S = 20.0
POLL_S = 0.05


def wait_until(what: str, predicate: Callable[[], bool], proxy: RunningProxy) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{proxy.output()}")
        time.sleep(POLL_S)


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_records(path: Path, count: int, proxy: RunningProxy) -> list[dict[str, Any]]:
    wait_until(f"{count} access records in {path.name}", lambda: len(records(path)) >= count, proxy)
    return records(path)


def exchange_raw(port: int, raw: bytes) -> bytes:
    """Send ``raw`` (a request with ``Connection: close``) and read everything until the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(raw)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    return bytes(received)


@pytest.fixture
def silent() -> Iterator[str]:
    """A server that accepts connections (the kernel does) and never answers: a 504."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def test_access_log_from_the_file_has_bytes_server_times_and_agent(
    factory: ProxyFactory, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "access.log"
    proxy = factory(overrides={"access_log": {"path": str(path)}})
    agent = "Agent/" + "x" * 300 + "\x01"
    body = b"b" * 1000
    raw = build_request(
        "/api/1/devices/x?token=s3cret&page=2",
        method="POST",
        host=host_of(proxy.sdk_port),
        headers=[("User-Agent", agent), ("Connection", "close"), ("Cookie", "c=s3cret")],
        body=body,
    )
    answer = exchange_raw(proxy.sdk_port, raw)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert get(proxy.sdk_port, "/admin").status == 403
    first, second = wait_records(path, 2, proxy)
    assert "s3cret" not in path.read_text()
    assert first["path"] == "/api/1/devices/x"
    assert first["query"] == "token=REDACTED&page=REDACTED"
    assert (first["bytes_in"], first["bytes_out"]) == (len(raw), len(answer))
    assert first["server"] == upstream.address
    assert first["upstream"] == "cobrowse"
    response_s, duration_s = first["upstream_response_s"], first["duration_s"]
    assert isinstance(response_s, float) and isinstance(duration_s, float)
    assert 0 <= response_s <= duration_s
    assert first["user_agent"] == agent[:200]
    assert (first["tls"], first["generation"], first["reason"]) == (False, 1, None)
    assert (second["status"], second["decision"], second["server"]) == (403, "deny", None)
    assert second["reason"] is not None
    assert second["upstream_response_s"] is None


@pytest.mark.parametrize(("mode", "query"), [("keep", "token=s3cret&page=2"), ("drop", None)])
def test_access_log_query_keep_and_drop(
    factory: ProxyFactory, tmp_path: Path, mode: str, query: str | None
) -> None:
    path = tmp_path / "access.log"
    proxy = factory(overrides={"access_log": {"path": str(path), "query": mode}})
    assert get(proxy.sdk_port, "/api/1/devices/x?token=s3cret&page=2").status == 200
    (record,) = wait_records(path, 1, proxy)
    assert (record["path"], record["query"]) == ("/api/1/devices/x", query)


def test_access_log_sample_zero_keeps_every_error(factory: ProxyFactory, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    proxy = factory(overrides={"access_log": {"path": str(path), "sample": 0}})
    for index in range(5):
        assert get(proxy.sdk_port, f"/api/1/devices/ok{index}").status == 200
    assert get(proxy.sdk_port, "/admin").status == 403
    assert get(proxy.sdk_port, "/api/1/devices/%2e%2e/x").status == 403
    assert exchange_raw(proxy.sdk_port, b"NOT A REQUEST\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    wait_records(path, 3, proxy)
    time.sleep(1.5)  # a flush later: still only the errors
    found = records(path)
    assert sorted(r["status"] for r in found) == [400, 403, 403]
    assert all(r["reason"] for r in found)
    unparsed = next(r for r in found if r["status"] == 400)
    assert (unparsed["method"], unparsed["decision"], unparsed["bytes_in"]) == (None, "reject", 17)


def test_access_log_reasons_of_502_and_504(
    factory: ProxyFactory, tmp_path: Path, silent: str
) -> None:
    refused_path, stalled_path = tmp_path / "refused.log", tmp_path / "stalled.log"
    closed = f"127.0.0.1:{free_port()}"
    # health = false: the one server is never marked down, so the request tries it
    no_health = {"cobrowse": {"health": False}}
    refused = factory(
        servers=[closed],
        overrides={"upstreams": no_health, "access_log": {"path": str(refused_path)}},
    )
    assert get(refused.sdk_port, "/api/1/devices/x").status == 502
    (record,) = wait_records(refused_path, 1, refused)
    assert (record["status"], record["reason"], record["decision"]) == (
        502,
        "upstream_failed",
        "error",
    )
    assert record["upstream_response_s"] is None
    stalled = factory(
        servers=[silent],
        first_byte_timeout_s=1.0,
        overrides={"upstreams": no_health, "access_log": {"path": str(stalled_path)}},
    )
    assert get(stalled.sdk_port, "/api/1/devices/x").status == 504
    (record,) = wait_records(stalled_path, 1, stalled)
    assert (record["status"], record["reason"], record["server"]) == (
        504,
        "upstream_timeout",
        silent,
    )
    assert record["upstream_response_s"] is None


def test_access_log_tls_flag_on_a_tls_listener(
    factory: ProxyFactory, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    ca = Authority(tmp_path / "certs")
    pair = ca.issue("sdk.example")
    path = tmp_path / "access.log"
    proxy = factory(
        overrides={"listeners": {"sdk": {"tls": pair.table()}}, "access_log": {"path": str(path)}}
    )
    with HttpConnection(proxy.sdk_port, tls=ca.client_context(), server_name="sdk.example") as c:
        assert c.get("/api/1/devices/secure").status == 200
    assert get(proxy.agent_port, "/api/1/plain").status == 200
    found = {r["path"]: r for r in wait_records(path, 2, proxy)}
    assert (found["/api/1/devices/secure"]["tls"], found["/api/1/devices/secure"]["listener"]) == (
        True,
        "sdk",
    )
    assert (found["/api/1/plain"]["tls"], found["/api/1/plain"]["listener"]) == (False, "agent")
    assert found["/api/1/devices/secure"]["bytes_out"] > 0


def test_access_log_file_config_reopened_by_every_worker_on_sigusr1(
    factory: ProxyFactory, tmp_path: Path
) -> None:
    path = tmp_path / "access.log"
    proxy = factory(overrides={"workers": 2, "access_log": {"path": str(path)}})
    assert all(get(proxy.sdk_port, f"/api/1/devices/before{i}").status == 200 for i in range(4))
    wait_records(path, 4, proxy)
    rotated = tmp_path / "access.log.1"
    path.rename(rotated)
    os.kill(proxy.pid, signal.SIGUSR1)
    wait_until(
        "both workers reopened",
        lambda: proxy.output().count("reopened 1 log files in worker") >= 2,
        proxy,
    )
    assert all(get(proxy.sdk_port, f"/api/1/devices/after{i}").status == 200 for i in range(4))
    new = [r["path"] for r in wait_records(path, 4, proxy)]
    old = [r["path"] for r in records(rotated)]
    assert sorted(old) == [f"/api/1/devices/before{i}" for i in range(4)]
    assert sorted(new) == [f"/api/1/devices/after{i}" for i in range(4)]


def test_reload_switches_the_access_log_on_and_off(factory: ProxyFactory, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    proxy = factory()
    assert get(proxy.sdk_port, "/api/1/devices/before").status == 200
    on = {**proxy.document, "access_log": {"path": str(path), "query": "keep"}}
    proxy.reload(on)
    proxy.wait_for_message("applied generation 2")
    assert get(proxy.sdk_port, "/api/1/devices/on?a=1").status == 200
    (record,) = wait_records(path, 1, proxy)
    assert (record["path"], record["query"], record["generation"]) == (
        "/api/1/devices/on",
        "a=1",
        2,
    )
    proxy.reload({**proxy.document, "access_log": {"enabled": False}})
    proxy.wait_for_message("applied generation 3")
    assert get(proxy.sdk_port, "/api/1/devices/off").status == 200
    proxy.reload(on)
    proxy.wait_for_message("applied generation 4")
    assert get(proxy.sdk_port, "/api/1/devices/again").status == 200
    wait_records(path, 2, proxy)
    assert [r["path"] for r in records(path)] == ["/api/1/devices/on", "/api/1/devices/again"]
    assert [r["generation"] for r in records(path)] == [2, 4]


def test_access_log_flag_wins_over_the_file(factory: ProxyFactory, tmp_path: Path) -> None:
    flag, file = tmp_path / "flag.log", tmp_path / "file.log"
    proxy = factory(
        overrides={"access_log": {"path": str(file), "query": "drop"}},
        args=["--access-log", str(flag)],
    )
    assert get(proxy.sdk_port, "/api/1/devices/x?a=1").status == 200
    (record,) = wait_records(flag, 1, proxy)
    assert (record["path"], record["query"]) == ("/api/1/devices/x", None)  # the file's query
    assert not file.exists()


def test_application_log_has_syslog_priorities_when_stderr_is_the_journal(
    factory: ProxyFactory, tmp_path: Path
) -> None:
    # the factory writes stderr to this file (opened again, same inode): stat it beforehand
    stderr_path = tmp_path / f"fastproxy-{len(factory.started)}.stderr"
    stderr_path.touch()
    stat = os.stat(stderr_path)
    proxy = factory(env={"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"})
    assert proxy.stderr_path == stderr_path
    wait_until("a worker's line", lambda: "<6>" in stderr_path.read_text(), proxy)
    proxy.stop()
    lines = [line for line in stderr_path.read_text().splitlines() if line]
    assert lines
    for line in lines:
        assert line[:3] in ("<6>", "<4>", "<3>", "<7>"), line
        record = json.loads(line[3:])
        expected = {"DEBUG": "<7>", "INFO": "<6>", "WARNING": "<4>", "ERROR": "<3>"}
        assert line[:3] == expected[record["level"]]


def test_application_log_plain_json_without_the_journal(factory: ProxyFactory) -> None:
    proxy = factory(env={"JOURNAL_STREAM": "1:1"})
    proxy.stop()
    lines = [line for line in proxy.stderr_path.read_text().splitlines() if line]
    assert lines
    assert all(json.loads(line)["level"] for line in lines)
