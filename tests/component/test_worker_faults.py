"""An exception escaping a worker callback: logged as JSON, and the client is not left hanging.

A worker's serving part (``WorkerState``, a listener, the loop's exception handler) runs on a
real uvloop loop in a child Python process (its metrics register in that process only), with
the exchange's method named by the test replaced by one that raises. Its stderr must be JSON
lines only, one of them the ERROR with the traceback; the client gets a 500
``internal_error`` (a timer's callback failed) or a close (a transport callback failed).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
END_WITHIN_S = 15.0

SCRIPT = """
import asyncio, functools, socket, sys, tomllib
from fastproxy import exchange, log, worker
from fastproxy.config import parse_config
from fastproxy.runtime import Snapshot

def boom(*args, **kwargs):
    raise RuntimeError("injected failure")

setattr(exchange.Exchange, sys.argv[1], boom)
log.setup("info")
config = parse_config(tomllib.loads('''
[upstreams.app]
servers = ["127.0.0.1:9"]
[listeners.sdk]
bind = "127.0.0.1:0"
policy = "cobrowse-sdk"
limits = { header_timeout_s = 0.5 }
'''), "fastproxy.toml")

async def main():
    loop = asyncio.get_running_loop()
    state = worker.WorkerState(Snapshot.build(config, 1), loop)
    loop.set_exception_handler(functools.partial(worker._on_loop_exception, state))
    sock = socket.create_server(("127.0.0.1", 0))
    await worker._start_listener(state, state.listeners["sdk"], sock)
    print(sock.getsockname()[1], flush=True)
    await asyncio.sleep(60)

import uvloop
uvloop.run(main())
"""


def _read_until_end(sock: socket.socket) -> tuple[bytes, bool]:
    deadline = time.monotonic() + END_WITHIN_S
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("method", "payload", "answered"),
    [
        # the header timeout's callback raises: the client gets a 500 and a close
        ("timer_fired", b"GET /api/1/devices HTTP/1.1\r\n", True),
        # data_received raises: uvloop closes the transport; the client sees the close
        ("client_data", b"GET /api/1/devices HTTP/1.1\r\nHost: a\r\n\r\n", False),
    ],
    ids=["timer", "data_received"],
)
def test_worker_exception_in_a_callback_is_json_and_ends_the_exchange(
    tmp_path: Path, method: str, payload: bytes, answered: bool
) -> None:
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, method],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=REPO_ROOT,
        )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as client:
            client.sendall(payload)
            data, ended = _read_until_end(client)
        assert ended, f"no answer or close within {END_WITHIN_S} s: {data!r}"
        if answered:
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 500 "), data
            assert json.loads(body)["error"] == "internal_error"
        else:
            assert data == b"", data
        deadline = time.monotonic() + END_WITHIN_S
        while b"injected failure" not in stderr_path.read_bytes():
            assert time.monotonic() < deadline, stderr_path.read_text()
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait(10.0)
        if child.stdout is not None:
            child.stdout.close()
    records = [json.loads(line) for line in stderr_path.read_text().splitlines()]
    assert all(isinstance(record, dict) for record in records), records
    failures = [r for r in records if "injected failure" in r.get("exc", "")]
    assert len(failures) == 1, records
    assert failures[0]["level"] == "ERROR"
    assert "RuntimeError" in failures[0]["exc"]
