"""The master's reload bookkeeping, without forking: what it tells systemd at the edges."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator

import pytest

from fastproxy.config import load_config
from fastproxy.master import Master, Worker


@pytest.fixture
def notifications(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    with tempfile.TemporaryDirectory(prefix="fp-") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.setblocking(False)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            yield sock


def _received(sock: socket.socket) -> list[bytes]:
    found = []
    while True:
        try:
            found.append(sock.recv(4096))
        except BlockingIOError:
            return found


def _master() -> Master:
    return Master(
        load_config(None), worker_target=lambda *args: None, loader=lambda: load_config(None)
    )


def test_master_a_reload_cut_short_by_a_stop_says_nothing_more(
    notifications: socket.socket,
) -> None:
    master = _master()
    # a worker still applying a generation when the stop began (no process: nothing is killed)
    worker = Worker(pid=-1, slot=0, channel=None, started=0.0, last_beat=0.0, killed=True)
    master._workers[worker.pid] = worker
    master._reload_pending = {worker.pid}
    master._stopping = True
    master._forget(worker)  # reaped during the drain
    assert _received(notifications) == []  # no READY=1 after STOPPING=1
    master.handle_hup()  # and a SIGHUP during the stop starts no reload
    assert _received(notifications) == []


def test_master_reload_during_start_up_keeps_ready_for_the_workers(
    notifications: socket.socket,
) -> None:
    master = _master()
    master._reload()  # no worker yet: applied at once, but the start is not over
    messages = _received(notifications)
    assert messages[0].startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    assert not any(m.startswith(b"READY=1") for m in messages), messages
    assert messages[-1].startswith(b"STATUS=2 listeners")
