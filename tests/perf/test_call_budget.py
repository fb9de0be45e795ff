"""Per-request work budget: Python function calls per proxied request, counted, not timed.

CI machines are noisy, so a timing threshold either flakes or is too loose to catch anything.
Counting calls is exact: the same code on the same input makes the same calls on every run and
every machine, so a change that doubles the hot path's work doubles the count and fails here.

The scenario, in one process and on one uvloop loop, without the master: a worker's
``WorkerState`` and a ``ClientProtocol`` server for one listener (``sdk``, policy
``cobrowse-sdk``), as ``worker._serve`` builds them, in front of a small keep-alive origin that
answers every request with the same 200 (Content-Length body, eight typical headers). One client
connection sends ``GET /api/1/devices/x`` requests one at a time. After a warm-up (the upstream
pool holds its connection, caches are filled), ``sys.setprofile`` counts the events of exactly
``MEASURED`` requests, with the garbage collector off, and the totals are divided by
``MEASURED``. The test runs once per parser (``http_parser`` fixture: h11 and httptools).

What is counted
---------------
*Own code* means the ``fastproxy`` package and the parser libraries it drives (h11, httptools,
wsproto).

- ``calls``: Python function calls into own code, plus calls made by own code into any other
  Python code (the standard library, prometheus-client), counted once at that boundary and not
  inside: the figure does not move with those libraries' internals.
- ``c_calls``: calls of builtins and C functions (``len``, ``bytes.find``, uvloop's
  ``transport.write``, httptools' parser...) made from own code.

The client and the origin are test code on the same loop; their calls are left out.

Re-recording
------------
After an intended change of the hot path, run ``pytest tests/perf -s``: each parser prints its
measured figures (whole numbers: every request makes the same calls). Set ``MEASURED_AT`` to
them; ``BUDGET`` adds 25% headroom. Re-record after a saving too, or the headroom grows and a
later regression of the same size passes unnoticed.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import cast

import h11
import httptools
import prometheus_client
import pytest
import uvloop
import wsproto

import fastproxy
from fastproxy import metrics, worker
from fastproxy.config import parse_config
from fastproxy.runtime import Snapshot

#: requests sent before counting: the pool connects, caches fill
WARMUP = 50
#: requests counted
MEASURED = 200
#: (calls, c_calls) per request as last recorded; see "Re-recording" above
#: per build (``fastproxy.BUILD.kind``: the suite runs on both) and parser. A compiled module's
#: functions run as C: ``sys.setprofile`` sees neither them nor the C calls they make, only the
#: Python code left around them (the worker, upstream pools, h11's internals), which is exactly
#: the interpreter work per request this build still does.
MEASURED_AT: dict[tuple[str, str], tuple[int, int]] = {
    ("python", "h11"): (119, 197),
    ("python", "httptools"): (80, 156),
    ("mypyc", "h11"): (62, 68),
    ("mypyc", "httptools"): (18, 17),
}
HEADROOM = 1.25
BUDGET = {key: (c * HEADROOM, cc * HEADROOM) for key, (c, cc) in MEASURED_AT.items()}
#: below this a request cannot have been proxied: the counter is not seeing the proxy
SANITY_MIN_CALLS = 10

ORIGIN_BODY = b'{"id":"x","platform":"web","connected":true,"agent":null,"updated":1700000000}'
ORIGIN_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 GMT\r\n"
    b"Server: origin\r\n"
    b"Content-Type: application/json; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"Cache-Control: no-store\r\n"
    b'ETag: "5f2b9c0d1e3a"\r\n'
    b"Vary: Accept-Encoding\r\n"
    b"X-Content-Type-Options: nosniff\r\n"
    b"\r\n" % len(ORIGIN_BODY)
) + ORIGIN_BODY
CLIENT_REQUEST = (
    b"GET /api/1/devices/x HTTP/1.1\r\n"
    b"Host: cobrowse.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) CobrowseSDK/2.30\r\n"
    b"Accept: application/json\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\n"
    b"Authorization: Bearer 0123456789abcdef\r\n"
    b"\r\n"
)


def _package_dir(module: object) -> str:
    path = getattr(module, "__file__", None)
    assert isinstance(path, str), module
    return os.path.dirname(os.path.abspath(path)) + os.sep


OWN_DIRS = tuple(_package_dir(m) for m in (fastproxy, h11, httptools, wsproto))


@dataclass
class Counts:
    own_calls: int = 0
    calls_out: int = 0
    c_calls: int = 0


class CallCounter:
    """A ``sys.setprofile`` hook counting the events described in the module docstring."""

    def __init__(self, own_dirs: tuple[str, ...]) -> None:
        self.own_dirs = own_dirs
        self.counts = Counts()

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if event == "call":
            if frame.f_code.co_filename.startswith(self.own_dirs):
                self.counts.own_calls += 1
                return
            caller = frame.f_back
            if caller is not None and caller.f_code.co_filename.startswith(self.own_dirs):
                self.counts.calls_out += 1
        elif event == "c_call" and frame.f_code.co_filename.startswith(self.own_dirs):
            self.counts.c_calls += 1


class Origin(asyncio.Protocol):
    """Answers every request head with ``ORIGIN_RESPONSE``, keeping the connection."""

    connections = 0

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        Origin.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            self.buffer = self.buffer[end + 4 :]
            assert self.transport is not None
            self.transport.write(ORIGIN_RESPONSE)


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(CLIENT_REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    assert await reader.readexactly(length) == ORIGIN_BODY


async def scenario(http_parser: str) -> Counts:
    loop = asyncio.get_running_loop()
    Origin.connections = 0
    origin = await loop.create_server(Origin, "127.0.0.1", 0)
    origin_port = origin.sockets[0].getsockname()[1]
    config = parse_config(
        {
            "workers": 1,
            "http_parser": http_parser,
            "admin": False,
            "upstreams": {"origin": {"servers": [f"127.0.0.1:{origin_port}"]}},
            "listeners": {"sdk": {"bind": "127.0.0.1:0", "policy": "cobrowse-sdk"}},
        },
        "perf.toml",
    )
    state = worker.WorkerState(Snapshot.build(config, 1), loop)
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    server = await loop.create_server(
        lambda: worker.ClientProtocol(state, state.listeners["sdk"]), sock=sock
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
    counter = CallCounter(OWN_DIRS)
    try:
        for _ in range(WARMUP):
            await exchange(reader, writer)
        gc.collect()
        gc.disable()
        sys.setprofile(counter)
        try:
            for _ in range(MEASURED):
                await exchange(reader, writer)
        finally:
            sys.setprofile(None)
            gc.enable()
        assert Origin.connections == 1, "the upstream connection was not kept"
    finally:
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        for pool in state.pools.values():
            pool.close_all()
        origin.close()
        await origin.wait_closed()
        for _ in range(3):  # let the transports' connection_lost callbacks run
            await asyncio.sleep(0)
    return counter.counts


@pytest.fixture
def worker_metrics_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Metrics as a worker has them (multiprocess files), kept out of the global registry.

    ``WorkerState`` registers its metrics in prometheus-client's default registry; a second
    ``WorkerState`` in this process would be refused as a duplicate.
    """
    monkeypatch.setenv(metrics.ENV, str(tmp_path / "metrics"))
    metrics.prepare_multiproc_dir()
    monkeypatch.setattr(prometheus_client.REGISTRY, "register", lambda collector: None)
    yield


@pytest.mark.usefixtures("worker_metrics_dir")
def test_calls_per_proxied_request(http_parser: str) -> None:
    loop = uvloop.new_event_loop()
    try:
        counts = loop.run_until_complete(scenario(http_parser))
    finally:
        loop.close()
    calls = (counts.own_calls + counts.calls_out) / MEASURED
    c_calls = counts.c_calls / MEASURED
    figures = (
        f"{http_parser}: {calls:g} calls ({counts.own_calls / MEASURED:g} in own code, "
        f"{counts.calls_out / MEASURED:g} out of it) and {c_calls:g} C calls per request"
    )
    key = (fastproxy.BUILD.kind, http_parser)
    print(f"\n{figures}; MEASURED_AT[{key!r}] = ({calls:g}, {c_calls:g})")
    budget_calls, budget_c_calls = BUDGET[key]
    assert calls > SANITY_MIN_CALLS, f"{figures}: the counter does not see the proxy"
    assert calls <= budget_calls, f"{figures}, over the budget of {budget_calls:.0f} calls"
    assert c_calls <= budget_c_calls, f"{figures}, over the budget of {budget_c_calls:.0f} C calls"
