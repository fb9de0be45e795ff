"""The channel between the master and one worker: heartbeats, reloads, acknowledgements.

Imports ``errors`` only, and the standard library (no asyncio: the master uses it from its
selector loop, the worker from an event-loop reader). One ``AF_UNIX`` ``SOCK_SEQPACKET``
socketpair per worker, made by the master before the fork: message boundaries are kept by the
kernel, so no framing is needed, and listening sockets travel with a message as ``SCM_RIGHTS``.

Messages
--------
- worker -> master: ``HEARTBEAT`` (one byte, about every second from the event loop; the first
  one means "accepting"), an acknowledgement ``{"op": "ack", "generation": N, "error": E}``
  (``E`` is null when the generation was applied), or a passive health report ``{"op": "down",
  "generation": N, "upstream": U, "server": S, "reason": R}`` (a connect to server ``S`` failed
  or it reset a request before any response byte).
- master -> worker: ``{"op": "reload", "generation": N, "source": S, "config": TEXT,
  "sockets": [NAME, ...]}`` with one descriptor per name, in order: the configuration as
  ``config.dump_config`` writes it (the worker loads it with the same code the master validated
  it with) and the listening sockets of listeners this generation adds; or the health table
  ``{"op": "health", "generation": N, "servers": {U: {S: true|false}}}`` (whole, after every
  change, and as the first message a new worker finds in its channel: queued before the fork).

Invariants: a message is at most ``MAX_MESSAGE_BYTES``; a malformed message is a
``ControlError`` (the master's own bug, never a peer's: both ends are fastproxy); descriptors
received with a message are owned by the receiver, which closes any it does not keep.
"""

from __future__ import annotations

import array
import json
import socket
from dataclasses import dataclass, field

from fastproxy.errors import FastproxyError

#: the heartbeat message: one byte, the same as the old heartbeat pipe carried
HEARTBEAT = b"."
#: largest message either side sends; a configuration dumps to a few kilobytes
MAX_MESSAGE_BYTES = 1024 * 1024
#: descriptors one reload can carry (one per added listener)
MAX_FDS = 64


class ControlError(FastproxyError):
    """A control message that does not have the documented shape."""


@dataclass(frozen=True, slots=True)
class Reload:
    """Apply configuration ``generation``; ``sockets`` are the listeners it adds."""

    generation: int
    source: str
    config: str
    sockets: dict[str, socket.socket] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ack:
    """A worker applied ``generation`` (``error`` is None) or could not (it says why)."""

    generation: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Health:
    """Every server's effective state, ``{upstream: {server label: up}}``."""

    generation: int
    servers: dict[str, dict[str, bool]]


@dataclass(frozen=True, slots=True)
class ServerDown:
    """A worker saw ``server`` of ``upstream`` fail (passive health)."""

    generation: int
    upstream: str
    server: str
    reason: str


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """``(master_end, worker_end)``; both close on exec, large enough for one reload message."""
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in (master_end, worker_end):
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * MAX_MESSAGE_BYTES)
    master_end.setblocking(False)
    return master_end, worker_end


def encode_reload(reload: Reload) -> bytes:
    """The message body of ``reload``; ``ControlError`` when it cannot be sent."""
    if len(reload.sockets) > MAX_FDS:
        raise ControlError(
            f"a reload adds {len(reload.sockets)} listeners; at most {MAX_FDS} at once"
        )
    return _encode(
        {
            "op": "reload",
            "generation": reload.generation,
            "source": reload.source,
            "config": reload.config,
            "sockets": list(reload.sockets),
        }
    )


def send_reload(sock: socket.socket, reload: Reload) -> None:
    """Send ``reload`` (blocking: the worker reads it from its loop within a heartbeat)."""
    body = encode_reload(reload)
    fds = [sock_.fileno() for sock_ in reload.sockets.values()]
    blocking = sock.getblocking()
    sock.setblocking(True)
    try:
        socket.send_fds(sock, [body], fds)
    finally:
        sock.setblocking(blocking)


def send_ack(sock: socket.socket, ack: Ack) -> None:
    body = _encode({"op": "ack", "generation": ack.generation, "error": ack.error})
    sock.sendall(body)


def encode_health(health: Health) -> bytes:
    return _encode({"op": "health", "generation": health.generation, "servers": health.servers})


def send_health(sock: socket.socket, body: bytes) -> None:
    """Send an encoded ``Health`` without blocking (``BlockingIOError``: the worker is behind)."""
    sock.send(body)


def send_down(sock: socket.socket, down: ServerDown) -> None:
    """Report a passive failure; ``BlockingIOError`` when the master is behind."""
    body = _encode(
        {
            "op": "down",
            "generation": down.generation,
            "upstream": down.upstream,
            "server": down.server,
            "reason": down.reason,
        }
    )
    sock.send(body)


Message = Reload | Ack | Health | ServerDown | bytes


def receive(sock: socket.socket) -> Message | None:
    """One message: a ``Reload``, an ``Ack``, a ``Health``, a ``ServerDown``, the heartbeat
    bytes, or None at end of stream.

    Raises ``BlockingIOError`` when nothing is waiting on a non-blocking socket.
    """
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE_BYTES, MAX_FDS)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        _close_fds(fds)
        raise ControlError("control message truncated")
    if not data:
        _close_fds(fds)
        return None
    if data == HEARTBEAT:
        _close_fds(fds)
        return data
    try:
        message = json.loads(data)
        op = message["op"]
        generation = int(message["generation"])
        if op == "ack":
            _close_fds(fds)
            error = message["error"]
            return Ack(generation, None if error is None else str(error))
        if op == "reload":
            names = [str(name) for name in message["sockets"]]
            if len(names) != len(fds):
                raise ControlError(f"{len(names)} socket names for {len(fds)} descriptors")
            sockets = {name: socket.socket(fileno=fd) for name, fd in zip(names, fds, strict=True)}
            fds = []
            return Reload(generation, str(message["source"]), str(message["config"]), sockets)
        if op == "health":
            _close_fds(fds)
            servers = {
                str(upstream): {str(label): bool(up) for label, up in states.items()}
                for upstream, states in message["servers"].items()
            }
            return Health(generation, servers)
        if op == "down":
            _close_fds(fds)
            return ServerDown(
                generation, str(message["upstream"]), str(message["server"]), str(message["reason"])
            )
    except (ValueError, KeyError, TypeError) as exc:
        _close_fds(fds)
        raise ControlError(f"malformed control message: {exc}") from exc
    _close_fds(fds)
    raise ControlError(f"unknown control message {op!r}")


def _encode(message: dict[str, object]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE_BYTES:
        raise ControlError(f"control message of {len(body)} bytes (at most {MAX_MESSAGE_BYTES})")
    return body


def _close_fds(fds: list[int] | array.array[int]) -> None:
    for fd in fds:
        socket.close(fd)
