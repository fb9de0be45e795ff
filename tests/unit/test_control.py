"""The master-worker channel: messages and descriptors over a real socketpair."""

from __future__ import annotations

import socket

import pytest

from fastproxy import control
from fastproxy.control import HEARTBEAT, Ack, ControlError, Reload


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_control_reload_carries_config_and_listening_sockets() -> None:
    master, worker = control.channel_pair()
    new = _listener()
    try:
        control.send_reload(master, Reload(3, "edge.toml", "workers = 2\n", {"agent": new}))
        message = control.receive(worker)
        assert isinstance(message, Reload)
        assert (message.generation, message.source, message.config) == (
            3,
            "edge.toml",
            "workers = 2\n",
        )
        [(name, received)] = message.sockets.items()
        assert name == "agent"
        # the same listening socket, under another descriptor owned by the receiver
        assert received.fileno() != new.fileno()
        assert received.getsockname() == new.getsockname()
        client = socket.create_connection(new.getsockname(), timeout=5)
        conn, _ = received.accept()
        conn.close()
        client.close()
        received.close()
    finally:
        new.close()
        master.close()
        worker.close()


def test_control_heartbeat_and_ack_keep_message_boundaries() -> None:
    master, worker = control.channel_pair()
    try:
        worker.send(HEARTBEAT)
        control.send_ack(worker, Ack(4))
        control.send_ack(worker, Ack(5, "listeners.x: cannot serve"))
        worker.send(HEARTBEAT)
        assert control.receive(master) == HEARTBEAT
        assert control.receive(master) == Ack(4)
        assert control.receive(master) == Ack(5, "listeners.x: cannot serve")
        assert control.receive(master) == HEARTBEAT
        with pytest.raises(BlockingIOError):
            control.receive(master)  # the master's end does not block
    finally:
        master.close()
        worker.close()


def test_control_end_of_stream_is_none() -> None:
    master, worker = control.channel_pair()
    worker.close()
    try:
        assert control.receive(master) is None
    finally:
        master.close()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{", "malformed control message"),
        (b'{"op": "reload", "generation": 1}', "malformed control message"),
        (b'{"op": "dance", "generation": 1}', "unknown control message 'dance'"),
        (
            b'{"op": "reload", "generation": 1, "source": "s", "config": "", "sockets": ["a"]}',
            "1 socket names for 0 descriptors",
        ),
    ],
)
def test_control_malformed_messages_are_errors(data: bytes, message: str) -> None:
    master, worker = control.channel_pair()
    try:
        master.send(data)
        with pytest.raises(ControlError) as caught:
            control.receive(worker)
        assert message in str(caught.value)
    finally:
        master.close()
        worker.close()


def test_control_refuses_an_oversize_message() -> None:
    master, worker = control.channel_pair()
    try:
        with pytest.raises(ControlError, match="control message of"):
            control.send_reload(master, Reload(1, "s", "x" * control.MAX_MESSAGE_BYTES))
    finally:
        master.close()
        worker.close()


def test_control_refuses_more_sockets_than_one_message_carries() -> None:
    sockets = {f"l{i}": socket.socket() for i in range(control.MAX_FDS + 1)}
    try:
        with pytest.raises(ControlError, match=f"at most {control.MAX_FDS} at once"):
            control.encode_reload(Reload(2, "s", "", sockets))
    finally:
        for sock in sockets.values():
            sock.close()
