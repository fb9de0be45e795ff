"""A raw uvloop TCP relay: the floor of what a Python proxy on uvloop can cost.

    python -m bench.relay --listen 127.0.0.1:8090 --origin 127.0.0.1:8000 --py 127.0.0.1:8001

No parsing and no policy: each client connection gets its own upstream connection and bytes are
copied both ways with backpressure. The upstream is picked once per connection from its first
bytes (WebSocket and upload paths go to ``--py``, everything else to ``--origin``), so the
runner's tests can use it like the proxies. A reference row, not a firewall.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import cast

import uvloop

ROUTE_TO_PY = (b" /sockets/", b" /api/1/devices/upload")


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.client.transport is not None:
            self.client.transport.write(data)

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.client.transport is not None:
            self.client.transport.close()


class Client(asyncio.Protocol):
    origin: tuple[str, int] = ("127.0.0.1", 8000)
    py: tuple[str, int] = ("127.0.0.1", 8001)

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.write(data)
            return
        self.pending.append(data)
        if up is None:
            self.upstream = Upstream(self)
            line = data.split(b"\r\n", 1)[0]
            target = self.py if any(p in line for p in ROUTE_TO_PY) else self.origin
            assert self.transport is not None
            self.transport.pause_reading()
            asyncio.get_running_loop().create_task(self._connect(target))

    async def _connect(self, target: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        upstream = self.upstream
        assert upstream is not None
        try:
            await loop.create_connection(lambda: upstream, *target)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        up = upstream.transport
        if up is None or self.transport is None:
            return
        up.writelines(self.pending)
        self.pending = []
        self.transport.resume_reading()

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(listen: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Client, *listen, backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__)
    parser.add_argument("--listen", type=_addr, required=True)
    parser.add_argument("--origin", type=_addr, required=True)
    parser.add_argument("--py", type=_addr, required=True)
    args = parser.parse_args(argv)
    Client.origin, Client.py = args.origin, args.py
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.listen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
