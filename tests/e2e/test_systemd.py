"""systemd integration end to end (SPEC 8): the notify protocol on a real datagram socket as
``NOTIFY_SOCKET``, the watchdog, and socket activation by name with ``systemd-socket-activate``.

systemd is not PID 1 where these run; what the master sends is what systemd would receive.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator

import pytest
from support.client import get
from support.proxy import ProxyFactory, RunningProxy, free_port, merge

pytestmark = pytest.mark.e2e

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate") or "systemd-socket-activate"


class Notifications:
    """A bound ``AF_UNIX`` datagram socket collecting what the master sends."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        self.received: list[str] = []

    def drain(self) -> list[str]:
        self.sock.setblocking(False)
        try:
            while True:
                self.received.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        return self.received

    def wait_for(self, prefix: str, *, count: int = 1, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while sum(m.startswith(prefix) for m in self.drain()) < count:
            assert time.monotonic() < deadline, f"no {prefix!r} in {self.received!r}"
            time.sleep(0.05)
        return self.received


@pytest.fixture
def notifications() -> Iterator[Notifications]:
    # AF_UNIX paths hold at most 107 bytes; pytest's tmp_path may be longer
    with tempfile.TemporaryDirectory(prefix="fp-") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            yield Notifications(sock, path)


def test_systemd_notify_sequence_on_start_reload_and_stop(
    factory: ProxyFactory, notifications: Notifications
) -> None:
    proxy = factory(overrides={"workers": 2}, env={"NOTIFY_SOCKET": notifications.path})
    received = notifications.wait_for("READY=1")
    [ready] = [m for m in received if m.startswith("READY=1")]
    assert ready == "READY=1\nSTATUS=2 listeners, 2 workers, generation 1"

    proxy.reload(merge(proxy.document, {"listeners": {"sdk": {"mode": "report"}}}))
    received = notifications.wait_for("READY=1", count=2)
    reloading = [m for m in received if m.startswith("RELOADING=1")]
    assert len(reloading) == 1
    usec = int(reloading[0].split("MONOTONIC_USEC=")[1])
    assert abs(usec / 1e6 - time.monotonic()) < 60  # CLOCK_MONOTONIC, as systemd compares it
    assert received[-1] == "READY=1\nSTATUS=2 listeners, 2 workers, generation 2"
    assert received.index(reloading[0]) < len(received) - 1

    proxy.reload(text="not = = toml")
    received = notifications.wait_for("READY=1", count=3)
    assert received[-2].startswith("RELOADING=1")
    assert received[-1].startswith("READY=1\nSTATUS=2 listeners, 2 workers, generation 2; ")
    assert "the last reload failed" in received[-1]

    assert proxy.stop() == 0
    assert notifications.drain()[-1] == "STOPPING=1"


def test_systemd_watchdog_only_while_every_worker_beats(
    factory: ProxyFactory, notifications: Notifications
) -> None:
    env = {"NOTIFY_SOCKET": notifications.path, "WATCHDOG_USEC": "1000000"}
    proxy = factory(env=env)
    notifications.wait_for("WATCHDOG=1", count=2)
    [worker] = proxy.worker_pids()
    os.kill(worker, signal.SIGSTOP)
    try:
        time.sleep(7.0)  # longer than WATCHDOG_FRESH_S: the stopped loop is seen as stale
        before = len(notifications.drain())
        time.sleep(3.0)
        assert notifications.drain()[before:].count("WATCHDOG=1") == 0
    finally:
        os.kill(worker, signal.SIGCONT)
    count = notifications.drain().count("WATCHDOG=1")
    notifications.wait_for("WATCHDOG=1", count=count + 1)
    assert proxy.worker_pids() == [worker]  # not replaced: the heartbeat timeout is longer


def test_systemd_socket_activation_matches_listeners_by_name(factory: ProxyFactory) -> None:
    # The config binds the very ports systemd-socket-activate holds: binding them again would
    # fail, so a working proxy proves it took the passed sockets. The names come in the other
    # order than the listeners: they are matched by name, never by position.
    sdk, agent = free_port(), free_port()
    binds = {"sdk": {"bind": f"127.0.0.1:{sdk}"}, "agent": {"bind": f"127.0.0.1:{agent}"}}
    prefix = [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{agent}", "-l", f"127.0.0.1:{sdk}"]
    prefix.append("--fdname=agent:sdk")
    proxy = factory(overrides={"listeners": binds}, wait=False, prefix=prefix)
    # the tool execs fastproxy at the first connection, which waits in the backlog meanwhile
    _wait_listening(proxy, sdk)
    proxy.wait_live()
    assert get(sdk, "/api/1/devices").status == 200
    assert get(sdk, "/admin").status == 403
    assert get(agent, "/some/page").status == 200  # the agent policy: the SPA's index
    messages = proxy.messages()
    for name, port, policy in (("sdk", sdk, "cobrowse-sdk"), ("agent", agent, "cobrowse-agent")):
        line = f"listening on 127.0.0.1:{port} (listener {name}, policy {policy}, "
        assert line + "socket from systemd)" in messages


def test_systemd_socket_naming_no_listener_stops_the_start(factory: ProxyFactory) -> None:
    port = free_port()
    prefix = [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", "--fdname=sdkk"]
    proxy = factory(wait=False, prefix=prefix)
    _wait_listening(proxy, port, require_alive=False)
    assert proxy.process.wait(timeout=30) == 1
    assert (
        'socket "sdkk" (FileDescriptorName=sdkk) names no listener; the listeners are: '
        "sdk, agent, admin" in proxy.output()
    )


def _wait_listening(
    proxy: RunningProxy, port: int, timeout: float = 30.0, *, require_alive: bool = True
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            assert not require_alive or proxy.alive(), proxy.output()
            assert time.monotonic() < deadline, proxy.output()
            time.sleep(0.05)
        else:
            return
