"""The recording upstream, with protocol-switch answers that the corpus needs beyond its own.

``sw=`` in the query string makes the upstream answer with a raw ``101 Switching Protocols``,
whatever the request, and then behave as a switched connection (it records what follows and
answers nothing more):

- ``sw=noaccept``: ``Upgrade: websocket`` without ``Sec-WebSocket-Accept``;
- ``sw=h2c``: ``Upgrade: h2c``;
- ``sw=ext``: the right accept, plus a ``Sec-WebSocket-Extensions`` nobody asked for;
- ``sw=twoaccepts``: the right accept twice;
- ``sw=length``: the right accept, and a ``Content-Length`` that a 101 may not have.

Every connection on which the upstream switched (these, and the recording upstream's own
``ws=echo`` and ``ws=badaccept``) is listed in ``switched`` by connection id: from there on its
raw bytes are not HTTP.

``rs=NAME`` makes the upstream answer with the raw bytes ``RAW_RESPONSES[NAME]`` (a response a
desync study of proxies turns up) and then close the connection, whatever the request.
"""

from __future__ import annotations

import asyncio

import h11
from support.upstream import (
    RecordedConnection,
    RecordedRequest,
    RecordingUpstream,
    query_params,
)
from wsproto.utilities import generate_accept_token

SWITCH_MODES = ("noaccept", "h2c", "ext", "twoaccepts", "length")

_OK = b"HTTP/1.1 200 OK\r\n"
#: raw answers for ``rs=NAME``: each one a response that some client or cache reads differently
RAW_RESPONSES: dict[str, bytes] = {
    "cl-te": _OK + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-cl": _OK + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "te-gzip-chunked": _OK + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te-identity": _OK + b"Transfer-Encoding: identity\r\nContent-Length: 2\r\n\r\nok",
    "te-chunked-twice": _OK + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    "cl-twice-equal": _OK + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    "cl-twice-differ": _OK + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
    "cl-list": _OK + b"Content-Length: 2, 2\r\n\r\nok",
    "cl-plus": _OK + b"Content-Length: +2\r\n\r\nok",
    "cl-underscore": _OK + b"Content_Length: 2\r\n\r\nok",
    "te-underscore": _OK + b"Transfer_Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "cl-space-before-colon": _OK + b"Content-Length : 2\r\n\r\nok",
    "body-on-204": b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
    "chunked-204": b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bytes-after-204": b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
    b"\r\nevil!",
    "bytes-after-304": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nevil!",
    "cl-on-100": b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\n"
    + _OK
    + b"Content-Length: 2\r\n\r\nok",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "obs-fold": _OK + b"X-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    "nul-in-field": _OK + b"X-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "status-two-digits": b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok",
    "status-http2": b"HTTP/2 200\r\nContent-Length: 2\r\n\r\nok",
    "leading-blank-line": b"\r\n" + _OK + b"Content-Length: 2\r\n\r\nok",
    "no-status-line": b"ok",
    "chunk-size-overflow": _OK + b"Transfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nx\r\n",
}


class CorpusUpstream(RecordingUpstream):
    """``RecordingUpstream`` plus the ``sw=`` answers and the ``switched`` record."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        #: ids of the connections on which this upstream left HTTP
        self.switched: set[int] = set()

    def reset(self) -> None:
        with self._lock:
            self.switched.clear()
        super().reset()

    async def _respond(
        self,
        conn: h11.Connection,
        request: RecordedRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rec: RecordedConnection,
    ) -> bool:
        params = query_params(request.target)
        raw = RAW_RESPONSES.get(params.get("rs", ""))
        if raw is not None:
            writer.write(raw)
            await writer.drain()
            return True  # the connection closes after it
        mode = params.get("sw")
        if mode not in SWITCH_MODES:
            return await super()._respond(conn, request, reader, writer, rec)
        key = request.header(b"sec-websocket-key") or b"none"
        accept = b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n"
        head = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
        if mode == "h2c":
            head += b"Upgrade: h2c\r\n"
        else:
            head += b"Upgrade: websocket\r\n"
        if mode == "ext":
            head += accept + b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
        elif mode == "twoaccepts":
            head += accept + accept
        elif mode == "length":
            head += accept + b"Content-Length: 0\r\n"
        with self._lock:
            self.switched.add(rec.conn_id)
        writer.write(head + b"\r\n")
        await writer.drain()
        while await self._read(reader, rec):  # switched: record whatever still comes
            pass
        return True

    async def _switch(
        self,
        conn: h11.Connection,
        request: RecordedRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rec: RecordedConnection,
        mode: str,
    ) -> None:
        with self._lock:
            self.switched.add(rec.conn_id)
        await super()._switch(conn, request, reader, writer, rec, mode)
