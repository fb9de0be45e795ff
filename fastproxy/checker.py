"""The master's active health checks: a small non-blocking HTTP/1.1 client on its selector.

[I/O] Imports ``health`` (the pure state it feeds), ``config`` (for the ``UpstreamTls`` key of
the client contexts) and the standard library; no thread, no event loop. The master registers
each check's socket on its own ``selectors`` loop, calls ``on_event`` when one is ready and
``tick`` on every pass of its loop (due checks start, overdue ones time out); what changes a
server's state comes back as ``health.Change``.

One check: ``connect`` (non-blocking); for an upstream with ``tls``, a TLS handshake with the
client context of its settings (``use_tls``: the master's current generation, built by
``tls.build``) and ``server_name`` (or the server's host) as SNI and verified name; send
``GET <path> HTTP/1.1`` with ``Host: <server>`` (``<server_name>:<port>`` when set) and
``Connection: close``, read up to the end of the status line, judge the status, close.
Refused, reset, timed out (``timeout_s`` from the connect to the status line, handshake
included), a failed handshake (``TLS: certificate verify failed: ...``), or a missing or
malformed status line: the check fails.

Each probe steps through ``CONNECTING``, ``HANDSHAKE`` (TLS only), ``SENDING`` and ``READING``;
every selector event runs the current step until it would block, and the step says what it
waits for (a TLS socket may want to write while reading and the other way round, so the
interest follows ``SSLWantReadError``/``SSLWantWriteError``, not the step). A TLS socket can
hold decrypted bytes the selector does not see: reading goes on until the socket would block.
Host names are resolved with ``getaddrinfo`` (blocking) and kept ``RESOLVE_TTL_S``: IP
literals, the usual case, never touch DNS.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import ssl
from collections.abc import Mapping

from fastproxy.config import UpstreamTls
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

#: the steps of one check (``DONE``: reported, its socket closed)
CONNECTING, HANDSHAKE, SENDING, READING, DONE = range(5)

#: the master's selector: check sockets are registered with their ``Probe`` as data
Selector = selectors.BaseSelector


class _Wait(Exception):
    """Control flow: the current step would block until ``events``."""

    def __init__(self, events: int) -> None:
        super().__init__(events)
        self.events = events


class Probe:
    """One check under way."""

    __slots__ = ("buf", "deadline", "events", "out", "sock", "state", "step", "tls")

    def __init__(
        self,
        state: ServerHealth,
        sock: socket.socket,
        deadline: float,
        out: bytes,
        tls: tuple[ssl.SSLContext, str] | None = None,
    ):
        self.state = state
        #: a TLS upstream's client context and server name (SNI, the name verified), as the
        #: settings were when the check started
        self.tls = tls
        #: the TCP socket, replaced by its ``ssl.SSLSocket`` once connected (TLS upstreams)
        self.sock = sock
        self.deadline = deadline
        #: request bytes not sent yet
        self.out = out
        self.buf = b""
        self.step = CONNECTING
        #: what the selector waits for on ``sock``
        self.events = selectors.EVENT_WRITE


class Checker:
    """Run the due checks of ``board`` on ``selector``."""

    def __init__(self, board: HealthBoard, selector: Selector) -> None:
        self.board = board
        self.selector = selector
        self.probes: dict[int, Probe] = {}
        self._resolved: dict[tuple[str, int], tuple[float, tuple[int, tuple[object, ...]]]] = {}
        self._tls: Mapping[UpstreamTls, ssl.SSLContext] = {}

    def use_tls(self, contexts: Mapping[UpstreamTls, ssl.SSLContext]) -> None:
        """The client contexts of the current generation (``tls.Contexts.upstreams``); checks
        under way keep the one they started with."""
        self._tls = contexts

    def tick(self, now: float) -> list[Change]:
        """Time out overdue checks, start due ones; the changes they made."""
        changes: list[Change] = []
        for probe in list(self.probes.values()):
            if probe.deadline <= now:
                where = " in the TLS handshake" if probe.step == HANDSHAKE else ""
                self._finish(probe, False, f"timed out{where}", changes)
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
        """``probe``'s socket is ready: run its steps until one would block or it ends."""
        changes: list[Change] = []
        if probe.sock.fileno() not in self.probes:
            return changes
        try:
            if probe.step == CONNECTING:
                self._connected(probe, changes)
            if probe.step == HANDSHAKE:
                sock = probe.sock
                assert isinstance(sock, ssl.SSLSocket)
                sock.do_handshake()
                probe.step = SENDING
            if probe.step == SENDING:
                self._send(probe)
            if probe.step == READING:
                self._read(probe, changes)
        except _Wait as wait:
            self._want(probe, wait.events)
        except ssl.SSLWantReadError:
            self._want(probe, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            self._want(probe, selectors.EVENT_WRITE)
        except ssl.SSLError as err:
            self._finish(probe, False, tls_reason(err), changes)
        except (OSError, ValueError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            if probe.step == HANDSHAKE:
                reason = f"TLS: {reason}"
            self._finish(probe, False, reason, changes)
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
        tls = None
        if state.tls is not None:
            context = self._tls.get(state.tls)
            if context is None:  # the master gives the contexts of every generation it syncs
                self._report(state, False, "TLS: no client context for its settings", changes)
                return
            tls = (context, state.tls.server_name or state.host)
        try:
            family, address = self._resolve(state, now)
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as err:
            self._report(state, False, f"cannot resolve or open a socket: {err}", changes)
            return
        sock.setblocking(False)
        host = state.label
        if state.tls is not None and state.tls.server_name:
            host = f"{state.tls.server_name}:{state.port}"
        request = _REQUEST % (check.path.encode("ascii"), host.encode("ascii"))
        probe = Probe(state, sock, now + check.timeout_s, request, tls)
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

    def _connected(self, probe: Probe, changes: list[Change]) -> None:
        """The connect ended: fail on its error; else the TLS step (upstreams with ``tls``) or
        the request."""
        error = probe.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
        if probe.tls is None:
            probe.step = SENDING
            return
        probe.step = HANDSHAKE
        context, server_hostname = probe.tls
        sock = probe.sock
        fd = sock.fileno()
        # the SSLSocket takes over the descriptor (``sock`` is detached): the selector and
        # the table follow it
        self.selector.unregister(sock)
        del self.probes[fd]
        try:
            probe.sock = context.wrap_socket(
                sock, server_hostname=server_hostname, do_handshake_on_connect=False
            )
        except (OSError, ValueError) as err:
            sock.close()  # closed already when the SSLSocket took it and failed
            probe.step = DONE
            reason = tls_reason(err) if isinstance(err, ssl.SSLError) else f"TLS: {err}"
            self._report(probe.state, False, reason, changes)
            return
        self.probes[fd] = probe
        self.selector.register(probe.sock, probe.events, probe)

    def _send(self, probe: Probe) -> None:
        while probe.out:
            try:
                sent = probe.sock.send(probe.out)
            except BlockingIOError:
                raise _Wait(selectors.EVENT_WRITE) from None
            probe.out = probe.out[sent:]
        probe.step = READING

    def _read(self, probe: Probe, changes: list[Change]) -> None:
        while True:
            try:
                data = probe.sock.recv(_READ_BYTES)
            except BlockingIOError:
                raise _Wait(selectors.EVENT_READ) from None
            if not data:
                self._finish(probe, False, "closed before a status line", changes)
                return
            probe.buf += data
            end = probe.buf.find(b"\r\n")
            if end >= 0:
                break
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

    def _want(self, probe: Probe, events: int) -> None:
        if probe.events != events:
            probe.events = events
            self.selector.modify(probe.sock, events, probe)

    def _finish(self, probe: Probe, ok: bool, detail: str, changes: list[Change]) -> None:
        probe.step = DONE
        self._close(probe)
        self._report(probe.state, ok, detail, changes)

    def _report(self, state: ServerHealth, ok: bool, detail: str, changes: list[Change]) -> None:
        change = self.board.check_done(state, ok, detail)
        if change is not None:
            changes.append(change)

    def _close(self, probe: Probe) -> None:
        sock = probe.sock
        fd = sock.fileno()
        if fd >= 0 and self.probes.pop(fd, None) is not None:
            self.selector.unregister(sock)
        sock.close()


def tls_reason(err: ssl.SSLError) -> str:
    """A failed check's reason for a TLS error: ``TLS: certificate verify failed: <why>``,
    ``TLS: wrong version number``, ``TLS: closed during the handshake``..."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {err.verify_message}"
    if isinstance(err, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "TLS: the server closed the connection"
    if err.reason:
        return f"TLS: {str(err.reason).lower().replace('_', ' ')}"
    return f"TLS: {err.strerror or err}"
