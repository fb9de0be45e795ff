"""A raw HTTP/1.1 origin for the end-to-end tests: exact bytes per request target.

``RawUpstream`` listens on 127.0.0.1 in a thread, reads each request head (bodies are not
expected), records its target and answers with the bytes its ``answers`` give for that target,
keeping the connection. An answer is bytes, or a function of the request head returning the
parts to write ``PART_GAP_S`` apart (so the proxy reads and relays them separately). Other
targets get 200 with the target as body.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Mapping

LOOPBACK = "127.0.0.1"
#: the pause between the parts of an answer
PART_GAP_S = 0.3

#: an answer: bytes, or the parts to write given the request head
Answer = bytes | Callable[[bytes], list[bytes]]


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class ThreadedOrigin:
    """A listening socket on 127.0.0.1 and a thread per accepted connection (``_serve``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> None:
        self._accepter.start()

    def stop(self) -> None:
        self._stopping.set()
        self._accepter.join(10.0)
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10.0)

    def _accept(self) -> None:
        index = 0
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            with self._lock:
                self._sockets.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock, index), daemon=True)
            self._threads.append(thread)
            thread.start()
            index += 1

    def _serve(self, sock: socket.socket, index: int) -> None:
        raise NotImplementedError

    @staticmethod
    def read_head(sock: socket.socket, buffer: bytes) -> tuple[bytes, bytes] | None:
        """The next request head and the bytes after it; None once the peer is gone (or a
        timeout or ``stop()`` ended the read). Request bodies are not expected."""
        while b"\r\n\r\n" not in buffer:
            try:
                data = sock.recv(65536)
            except OSError:
                return None
            if not data:
                return None
            buffer += data
        head, _, rest = buffer.partition(b"\r\n\r\n")
        return head, rest


class RawUpstream(ThreadedOrigin):
    """A threaded origin answering each request head with exact bytes chosen by its target."""

    def __init__(self, answers: Mapping[bytes, Answer]) -> None:
        super().__init__()
        self.answers = answers
        self.targets: list[bytes] = []

    def _serve(self, sock: socket.socket, index: int) -> None:
        buffer = b""
        with sock:
            while not self._stopping.is_set():
                taken = self.read_head(sock, buffer)
                if taken is None:
                    return
                head, buffer = taken
                target = head.split(b" ", 2)[1]
                with self._lock:
                    self.targets.append(target)
                answer = self.answers.get(target)
                if answer is None:
                    parts = [ok(target)]
                elif isinstance(answer, bytes):
                    parts = [answer]
                else:
                    parts = answer(head)
                try:
                    for number, part in enumerate(parts):
                        if number:
                            time.sleep(PART_GAP_S)
                        sock.sendall(part)
                except OSError:
                    return
