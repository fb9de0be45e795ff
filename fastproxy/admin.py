"""The admin listener: ``/metrics``, ``/livez``, ``/readyz``, ``/routes``.

[I/O] Imports ``metrics`` and ``http1`` (the reply writer) only; runs inside every worker, so
the master never serves traffic nor runs a thread. One request per connection (``Connection:
close``): scrapes and probes are rare, and simplicity beats keep-alive here. Nothing from the
request is echoed. ``/readyz`` is 503 with a JSON reason while draining or while a listener's
default upstream has no server up; ``fastproxy_upstream_up`` comes from the health table the
worker holds (the master's, the same in every worker), one value per server.
"""

from __future__ import annotations

import asyncio
import json
from typing import Protocol, cast

from fastproxy import metrics
from fastproxy.http1 import local_response

MAX_REQUEST_BYTES = 8 * 1024


class WorkerView(Protocol):
    """What the admin endpoints read from the worker."""

    draining: bool

    def routes_json(self) -> bytes:
        """The compiled tables of the current generation, as JSON."""
        ...

    def readiness(self) -> dict[str, object] | None:
        """Why ``/readyz`` says 503 (draining, an upstream with no server up); None: ready."""
        ...

    def upstream_states(self) -> list[tuple[str, str, bool]]:
        """``(upstream, server, up)`` of the health table this worker holds (the master's)."""
        ...

    def publish_metrics(self) -> None:
        """Add this worker's per-request counts to the scraped files now."""
        ...

    def certificate_expiry(self) -> list[tuple[str, str, float]]:
        """``(listener, cert, not_after)`` of the current listeners' certificates."""
        ...

    def parser_name(self) -> str:
        """The HTTP parser of the current configuration (``h11`` or ``httptools``)."""
        ...


class AdminProtocol(asyncio.Protocol):
    """Answer one admin request and close."""

    __slots__ = ("buf", "transport", "worker")

    def __init__(self, worker: WorkerView) -> None:
        self.worker = worker
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_REQUEST_BYTES:
                self._reply(431, b"text/plain", b"request too large\n")
            return
        request_line = self.buf[: self.buf.find(b"\r\n")]
        parts = request_line.split(b" ")
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            self._reply(405, b"text/plain", b"method not allowed\n")
            return
        path = parts[1].split(b"?", 1)[0]
        if path == b"/metrics":
            worker = self.worker
            worker.publish_metrics()  # this worker's last second; the others' are at most 1 s late
            body = metrics.render(
                worker.upstream_states(),
                worker.certificate_expiry(),
                worker.parser_name(),
            )
            self._reply(200, metrics.CONTENT_TYPE, body, head=parts[0] == b"HEAD")
        elif path == b"/livez":
            self._reply(200, b"text/plain", b"ok\n")
        elif path == b"/readyz":
            reason = self.worker.readiness()
            if reason is not None:
                self._reply(503, b"application/json", json.dumps(reason).encode() + b"\n")
            else:
                self._reply(200, b"text/plain", b"ready\n")
        elif path == b"/routes":
            self._reply(200, b"application/json", self.worker.routes_json())
        else:
            self._reply(404, b"text/plain", b"not found\n")

    def _reply(self, status: int, content_type: bytes, body: bytes, *, head: bool = False) -> None:
        transport = self.transport
        if transport is None:
            return
        transport.write(
            local_response(status, body, content_type=content_type, close=True, head_only=head)
        )
        transport.close()
        self.transport = None
