"""A fault-injecting TCP proxy between fastproxy and an upstream (asyncpg's ``TCPFuzzingProxy``).

``FaultProxy`` listens on 127.0.0.1 and relays every connection to ``target`` in two threads, one
per direction. Requests (fastproxy to upstream) pass untouched. The upstream's bytes pass until
the ``Phase`` of the current ``fault`` is reached in the response stream; then the ``Action``
happens on the connection to fastproxy:

- ``CUT``: a clean close (FIN) of both connections;
- ``RESET``: ``SO_LINGER`` 0 and close, so fastproxy gets a RST;
- ``STALL``: nothing more is relayed (the upstream's bytes are read and dropped), both
  connections stay open until fastproxy gives up and closes its side.

Phases are found on the bytes: the response head ends at the first CRLFCRLF (a 1xx head is not
told apart; the tests do not send ``Expect``). ``MID_BODY`` relays the head and half of the body
bytes read so far, ``MID_CHUNKED`` the head and a few bytes into the first chunk's data,
``AFTER_101`` the whole 101 head and none of the frames after it, ``MID_FRAME`` the 101 head (at
once: the frame is an echo of the client's, which follows the 101) and the first byte of the
first frame. With ``fault`` None the proxy is a plain relay. A fault applies
to every connection opened while it is set; ``faulted`` counts the connections it hit.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from support.raw import ThreadedOrigin

READ_SIZE = 65536
_LINGER_RESET = struct.pack("ii", 1, 0)
_HEAD_END = b"\r\n\r\n"
#: how far into the first chunk's data ``MID_CHUNKED`` cuts (past a chunk-size line of a few bytes)
CHUNK_CUT_BYTES = 24


class Action(enum.Enum):
    CUT = "cut"
    STALL = "stall"
    RESET = "reset"


class Phase(enum.Enum):
    BEFORE_HEAD = "before_head"
    MID_HEAD = "mid_head"
    AFTER_HEAD = "after_head"
    MID_BODY = "mid_body"
    MID_CHUNKED = "mid_chunked"
    BEFORE_101 = "before_101"
    AFTER_101 = "after_101"
    MID_FRAME = "mid_frame"


def _head_end(seen: bytes) -> int | None:
    index = seen.find(_HEAD_END)
    return None if index < 0 else index + len(_HEAD_END)


def _before(seen: bytes) -> int | None:
    return 0 if seen else None


def _mid_head(seen: bytes) -> int | None:
    end = _head_end(seen)
    return None if end is None else end // 2


def _after_head(seen: bytes) -> int | None:
    return _head_end(seen)


def _mid_body(seen: bytes) -> int | None:
    end = _head_end(seen)
    if end is None or len(seen) < end + 2:
        return None
    return end + (len(seen) - end) // 2


def _mid_chunked(seen: bytes) -> int | None:
    end = _head_end(seen)
    if end is None or len(seen) <= end + CHUNK_CUT_BYTES:
        return None
    return end + CHUNK_CUT_BYTES


def _mid_frame(seen: bytes) -> int | None:
    end = _head_end(seen)
    if end is None or len(seen) < end + 2:
        return None
    return end + 1


#: where each phase stops relaying, given the upstream's bytes so far (None: not there yet)
STOPS: dict[Phase, Callable[[bytes], int | None]] = {
    Phase.BEFORE_HEAD: _before,
    Phase.MID_HEAD: _mid_head,
    Phase.AFTER_HEAD: _after_head,
    Phase.MID_BODY: _mid_body,
    Phase.MID_CHUNKED: _mid_chunked,
    Phase.BEFORE_101: _before,
    Phase.AFTER_101: _after_head,
    Phase.MID_FRAME: _mid_frame,
}


@dataclass(frozen=True)
class Fault:
    action: Action
    phase: Phase


class _Pair:
    """One relayed connection: ``down`` faces fastproxy, ``up`` the upstream."""

    def __init__(self, down: socket.socket, up: socket.socket, fault: Fault | None) -> None:
        self.down = down
        self.up = up
        self.fault = fault
        self.lock = threading.Lock()
        self.closed = False

    def close(self, *, reset: bool = False) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        if reset:
            with contextlib.suppress(OSError):
                self.down.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        for sock in (self.down, self.up):
            # a shutdown wakes the other thread's recv (a close alone would not release the
            # socket under it); SHUT_RD sends nothing, so the reset stays a reset
            how = socket.SHUT_RD if reset and sock is self.down else socket.SHUT_RDWR
            with contextlib.suppress(OSError):
                sock.shutdown(how)
            with contextlib.suppress(OSError):
                sock.close()


class FaultProxy(ThreadedOrigin):
    """A TCP relay on 127.0.0.1 to ``target`` (``host:port``) that injects ``fault``: each
    accepted connection is relayed upstream by its own thread, and back by a second one."""

    def __init__(self, target: str) -> None:
        super().__init__()
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        #: the fault for connections opened from now on (None: relay faithfully)
        self.fault: Fault | None = None
        #: connections a fault was applied to
        self.faulted = 0
        self._pairs: list[_Pair] = []
        #: exceptions the relay threads raised (a test fails on them)
        self.errors: list[BaseException] = []

    def stop(self) -> None:
        # closing the pairs first wakes relays blocked on a stalled upstream
        self._stopping.set()
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.close()
        super().stop()

    def _serve(self, sock: socket.socket, index: int) -> None:
        sock.settimeout(None)
        try:
            up = socket.create_connection(self.target, timeout=5.0)
        except OSError:
            sock.close()
            return
        up.settimeout(None)
        pair = _Pair(sock, up, self.fault)
        backward = threading.Thread(target=self._guard, args=(self._backward, pair), daemon=True)
        with self._lock:
            self._pairs = [p for p in self._pairs if not p.closed]
            self._pairs.append(pair)
            self._threads.append(backward)
        backward.start()
        self._guard(self._forward, pair)

    def _guard(self, relay: Callable[[_Pair], None], pair: _Pair) -> None:
        try:
            relay(pair)
        except OSError:
            pair.close()  # one side went away: the relay ends
        except BaseException as exc:  # reported to the test, never lost in a thread
            self.errors.append(exc)
            pair.close()

    @staticmethod
    def _forward(pair: _Pair) -> None:
        """fastproxy -> upstream, untouched; fastproxy's close ends the pair."""
        while True:
            data = pair.down.recv(READ_SIZE)
            if not data:
                pair.close()
                return
            pair.up.sendall(data)

    def _backward(self, pair: _Pair) -> None:
        """upstream -> fastproxy, up to the fault's phase; then the fault."""
        fault = pair.fault
        stop_at = STOPS[fault.phase] if fault is not None else None
        seen = b""
        sent = 0
        while True:
            data = pair.up.recv(READ_SIZE)
            if not data:
                if sent < len(seen):
                    pair.down.sendall(seen[sent:])
                pair.close()
                return
            if stop_at is None:
                pair.down.sendall(data)
                continue
            seen += data
            stop = stop_at(seen)
            if stop is None:
                if fault is not None and fault.phase is Phase.MID_FRAME:
                    # the 101 goes on at once: the frame to cut comes only after it
                    ready = _head_end(seen) or 0
                    if ready > sent:
                        pair.down.sendall(seen[sent:ready])
                        sent = ready
                continue
            if stop > sent:
                pair.down.sendall(seen[sent:stop])
            assert fault is not None
            with self._lock:
                self.faulted += 1
            if fault.action is Action.STALL:
                while pair.up.recv(READ_SIZE):
                    pass  # dropped; fastproxy's timeout ends this, closing its side
                return
            pair.close(reset=fault.action is Action.RESET)
            return
