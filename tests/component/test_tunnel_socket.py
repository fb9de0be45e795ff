"""``upstream.TunnelSocket``, the upstream side of a WebSocket tunnel as a bare descriptor, on a
real uvloop loop over a real socket pair: reads reach the owner, writes the kernel does not take
are queued and flushed, the owner is paused past the high-water mark and resumed when the queue
drains, a close flushes first, and an end of stream is reported once, on a later loop pass.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
import uvloop

from fastproxy.config import parse_config
from fastproxy.upstream import TUNNEL_HIGH_WATER_BYTES, TunnelSocket, UpstreamPool, UpstreamProtocol


class Owner:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.events: list[str] = []

    def on_upstream_ready(self, conn: UpstreamProtocol) -> None:
        raise AssertionError("not for a tunnel")

    def on_upstream_failed(self, code: str, config: object) -> None:
        raise AssertionError("not for a tunnel")

    def on_upstream_data(self, data: bytes) -> None:
        self.data.append(data)

    def on_upstream_lost(self) -> None:
        self.events.append("lost")

    def on_upstream_pause_writing(self) -> None:
        self.events.append("pause")

    def on_upstream_resume_writing(self) -> None:
        self.events.append("resume")


async def _until(check: object, what: str) -> None:
    assert callable(check)
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"not within 5 s: {what}")


def _pool(loop: asyncio.AbstractEventLoop) -> UpstreamPool:
    config = parse_config(
        {
            "upstreams": {"app": {"servers": ["127.0.0.1:9"]}},
            "listeners": {"sdk": {"bind": "127.0.0.1:0", "policy": "cobrowse-sdk"}},
        },
        "fastproxy.toml",
    )
    return UpstreamPool(config.upstreams["app"], loop)


@pytest.mark.timeout(60)
def test_tunnel_socket_reads_writes_pauses_and_closes() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = _pool(loop).servers[0]
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        peer.setblocking(False)
        owner = Owner()
        server.active = 1
        tunnel = TunnelSocket(os.dup(ours.fileno()), server, owner)
        ours.close()
        tunnel.resume_reading()
        try:
            peer.send(b"from the upstream")
            await _until(lambda: owner.data == [b"from the upstream"], "the read")
            # the peer does not read: the kernel fills, the rest is queued, the owner paused
            big = os.urandom(4 * TUNNEL_HIGH_WATER_BYTES)
            for start in range(0, len(big), 64 * 1024):
                tunnel.write(big[start : start + 64 * 1024])
            assert owner.events == ["pause"]
            received = bytearray()

            def drain() -> bool:
                try:
                    while chunk := peer.recv(1 << 20):
                        received.extend(chunk)
                except BlockingIOError:
                    pass
                return len(received) == len(big)

            await _until(drain, "the queued bytes flushed")
            assert bytes(received) == big and owner.events == ["pause", "resume"]
            # paused reading: the owner hears nothing until reading resumes
            tunnel.pause_reading()
            peer.send(b"held")
            await asyncio.sleep(0.2)
            assert owner.data == [b"from the upstream"]
            tunnel.resume_reading()
            await _until(lambda: owner.data[-1:] == [b"held"], "the held read")
            # a close flushes what was written, then a FIN; the owner is not told
            tunnel.write(b"last words")
            tunnel.discard()
            assert server.active == 0 and not tunnel.is_open
            tail = bytearray()

            def until_eof() -> bool:
                try:
                    while chunk := peer.recv(1 << 16):
                        tail.extend(chunk)
                    return True  # b"": the end of the stream
                except BlockingIOError:
                    return False

            await _until(until_eof, "the FIN")
            assert bytes(tail) == b"last words" and "lost" not in owner.events
            tunnel.write(b"after the close")  # ignored, no error
        finally:
            peer.close()

    uvloop.run(scenario())


@pytest.mark.timeout(60)
def test_tunnel_socket_reports_the_upstream_end_once_on_a_later_pass() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = _pool(loop).servers[0]
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        owner = Owner()
        tunnel = TunnelSocket(os.dup(ours.fileno()), server, owner)
        ours.close()
        tunnel.resume_reading()
        peer.sendall(b"bye")
        peer.close()
        await _until(lambda: owner.events == ["lost"], "the end reported")
        assert owner.data == [b"bye"] and not tunnel.is_open
        tunnel.write(b"too late")  # the descriptor is closed: ignored
        tunnel.close()
        await asyncio.sleep(0.1)
        assert owner.events == ["lost"]

    uvloop.run(scenario())
