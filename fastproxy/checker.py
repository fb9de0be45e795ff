"""The master's active health checks: a small non-blocking HTTP/1.1 client on its selector.

[I/O] Imports ``health`` (the pure state it feeds) and the standard library; no thread, no
event loop. The master registers each check's socket on its own ``selectors`` loop, calls
``on_event`` when one is ready and ``tick`` on every pass of its loop (due checks start,
overdue ones time out); what changes a server's state comes back as ``health.Change``.

One check: ``connect`` (non-blocking), send ``GET <path> HTTP/1.1`` with ``Host: <server>``
and ``Connection: close``, read up to the end of the status line, judge the status, close.
Refused, reset, timed out (``timeout_s`` from the connect to the status line), or a missing
or malformed status line: the check fails.

Seams: ``Probe._connected`` is the step between the TCP connect and the request, where a TLS
handshake (``ssl.MemoryBIO``) goes once upstreams can use TLS; upstreams have no TLS yet.
Host names are resolved with ``getaddrinfo`` (blocking) and kept ``RESOLVE_TTL_S``: IP
literals, the usual case, never touch DNS.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket

from fastproxy.health import (
    MAX_STATUS_LINE_BYTES,
    Change,
    HealthBoard,
    ServerHealth,
    parse_status_line,
    status_passes,
)

#: how long a resolved host name is used before it is resolved again
RESOLVE_TTL_S = 30.0
_READ_BYTES = 4096
_REQUEST = b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nUser-Agent: fastproxy\r\n\r\n"

#: the master's selector: check sockets are registered with their ``Probe`` as data
Selector = selectors.BaseSelector


class Probe:
    """One check under way."""

    __slots__ = ("buf", "deadline", "out", "sock", "state")

    def __init__(self, state: ServerHealth, sock: socket.socket, deadline: float, out: bytes):
        self.state = state
        self.sock = sock
        self.deadline = deadline
        #: request bytes not sent yet; empty once the request is out (reading the answer)
        self.out = out
        self.buf = b""


class Checker:
    """Run the due checks of ``board`` on ``selector``."""

    def __init__(self, board: HealthBoard, selector: Selector) -> None:
        self.board = board
        self.selector = selector
        self.probes: dict[int, Probe] = {}
        self._resolved: dict[tuple[str, int], tuple[float, tuple[int, tuple[object, ...]]]] = {}

    def tick(self, now: float) -> list[Change]:
        """Time out overdue checks, start due ones; the changes they made."""
        changes: list[Change] = []
        for probe in list(self.probes.values()):
            if probe.deadline <= now:
                self._finish(probe, False, "timed out", changes)
        for state in self.board.due(now):
            self._start(state, now, changes)
        return changes

    def next_wakeup(self) -> float | None:
        times = [p.deadline for p in self.probes.values()]
        planned = self.board.next_event()
        if planned is not None:
            times.append(planned)
        return min(times) if times else None

    def on_event(self, probe: Probe, events: int, now: float) -> list[Change]:
        changes: list[Change] = []
        if probe.sock.fileno() not in self.probes:
            return changes
        try:
            if probe.out:
                self._write(probe, changes)
            elif events & selectors.EVENT_READ:
                self._read(probe, changes)
        except OSError as err:
            self._finish(probe, False, err.strerror or str(err), changes)
        return changes

    def close_all(self) -> None:
        """Abandon every check (the master stops)."""
        for probe in list(self.probes.values()):
            self._close(probe)

    def close_in_child(self) -> None:
        """A forked worker closes its copies of the check sockets (the selector is not its own)."""
        for probe in self.probes.values():
            probe.sock.close()
        self.probes.clear()

    # -- one check ----------------------------------------------------------------------------

    def _start(self, state: ServerHealth, now: float, changes: list[Change]) -> None:
        check = state.check
        assert check is not None
        self.board.check_started(state, now)
        try:
            family, address = self._resolve(state, now)
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as err:
            self._report(state, False, f"cannot resolve or open a socket: {err}", changes)
            return
        sock.setblocking(False)
        request = _REQUEST % (check.path.encode("ascii"), state.label.encode("ascii"))
        probe = Probe(state, sock, now + check.timeout_s, request)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._report(state, False, os.strerror(code), changes)
            return
        self.probes[sock.fileno()] = probe
        self.selector.register(sock, selectors.EVENT_WRITE, probe)

    def _resolve(self, state: ServerHealth, now: float) -> tuple[int, tuple[object, ...]]:
        key = (state.host, state.port)
        cached = self._resolved.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        infos = socket.getaddrinfo(state.host, state.port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        result = (int(family), tuple(address))
        self._resolved[key] = (now + RESOLVE_TTL_S, result)
        return result

    def _write(self, probe: Probe, changes: list[Change]) -> None:
        error = probe.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._finish(probe, False, os.strerror(error), changes)
            return
        self._connected(probe)
        sent = probe.sock.send(probe.out)
        probe.out = probe.out[sent:]
        if not probe.out:
            self.selector.modify(probe.sock, selectors.EVENT_READ, probe)

    def _connected(self, probe: Probe) -> None:
        """The TCP connection is up: where a TLS handshake would go (upstreams have no TLS)."""

    def _read(self, probe: Probe, changes: list[Change]) -> None:
        data = probe.sock.recv(_READ_BYTES)
        if not data:
            self._finish(probe, False, "closed before a status line", changes)
            return
        probe.buf += data
        end = probe.buf.find(b"\r\n")
        if end < 0:
            if len(probe.buf) > MAX_STATUS_LINE_BYTES:
                self._finish(probe, False, "no status line", changes)
            return
        status = parse_status_line(probe.buf[:end])
        check = probe.state.check
        if status is None or check is None:
            self._finish(probe, False, "malformed status line", changes)
        elif status_passes(status, check.statuses):
            self._finish(probe, True, f"status {status}", changes)
        else:
            self._finish(probe, False, f"status {status}", changes)

    def _finish(self, probe: Probe, ok: bool, detail: str, changes: list[Change]) -> None:
        self._close(probe)
        self._report(probe.state, ok, detail, changes)

    def _report(self, state: ServerHealth, ok: bool, detail: str, changes: list[Change]) -> None:
        change = self.board.check_done(state, ok, detail)
        if change is not None:
            changes.append(change)

    def _close(self, probe: Probe) -> None:
        sock = probe.sock
        fd = sock.fileno()
        if self.probes.pop(fd, None) is not None:
            self.selector.unregister(sock)
        sock.close()
