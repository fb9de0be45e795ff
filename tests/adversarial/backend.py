"""The recording upstream, with protocol-switch answers that the corpus needs beyond its own.

``sw=`` in the query string makes the upstream answer with a raw ``101 Switching Protocols``,
whatever the request, and then behave as a switched connection (it records what follows and
answers nothing more):

- ``sw=noaccept``: ``Upgrade: websocket`` without ``Sec-WebSocket-Accept``;
- ``sw=h2c``: ``Upgrade: h2c``;
- ``sw=ext``: the right accept, plus a ``Sec-WebSocket-Extensions`` nobody asked for;
- ``sw=twoaccepts``: the right accept twice.

Every connection on which the upstream switched (these, and the recording upstream's own
``ws=echo`` and ``ws=badaccept``) is listed in ``switched`` by connection id: from there on its
raw bytes are not HTTP.
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

SWITCH_MODES = ("noaccept", "h2c", "ext", "twoaccepts")


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
        mode = query_params(request.target).get("sw")
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
