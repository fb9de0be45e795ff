"""systemd integration: notifications to a real ``AF_UNIX``/``SOCK_DGRAM`` socket (a path and an
abstract name), watchdog variables, socket activation with real inherited descriptors (through
``systemd-socket-activate`` where it can set them up, a child that arranges its own descriptors
where it cannot), and the pairing of passed sockets with listeners. Error messages verbatim."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastproxy import systemd
from fastproxy.systemd import SystemdError

ROOT = Path(__file__).resolve().parents[2]
#: from the systemd package; missing, the tests that run it fail (there is no skip)
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate") or "systemd-socket-activate"

# --------------------------------------------------------------------------------------------
# Notification


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A bound datagram socket and the environment that names it, as systemd's would."""
    # AF_UNIX paths hold at most 107 bytes; pytest's tmp_path may be longer.
    with tempfile.TemporaryDirectory(prefix="fp-") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5)
            yield sock, {"NOTIFY_SOCKET": path}


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, dict[str, str]]]:
    name = f"fastproxy-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        yield sock, {"NOTIFY_SOCKET": "@" + name}


def test_systemd_notify_sends_one_datagram_to_a_path(
    receiver: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, environ = receiver
    assert systemd.notify("READY=1\nSTATUS=up", environ=environ)
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_systemd_notify_sends_to_an_abstract_name(
    abstract_receiver: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, environ = abstract_receiver
    assert systemd.notify("WATCHDOG=1", environ=environ)
    assert sock.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"NOTIFY_SOCKET": ""},
        {"NOTIFY_SOCKET": "@"},
        {"NOTIFY_SOCKET": "relative/notify"},
        {"NOTIFY_SOCKET": "vsock:2:1234"},
    ],
    ids=["unset", "empty", "bare-at", "relative", "vsock"],
)
def test_systemd_notify_without_a_usable_address_is_false(environ: dict[str, str]) -> None:
    assert systemd.notify("READY=1", environ=environ) is False


def test_systemd_notify_to_a_missing_socket_is_false_not_an_error(tmp_path: Path) -> None:
    environ = {"NOTIFY_SOCKET": str(tmp_path / "gone")}
    assert systemd.notify("READY=1", environ=environ) is False
    abstract = {"NOTIFY_SOCKET": f"@fastproxy-test-nobody-{secrets.token_hex(8)}"}
    assert systemd.notify("READY=1", environ=abstract) is False


def test_systemd_notify_helpers_send_the_documented_messages(
    receiver: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, environ = receiver
    assert systemd.notify_ready(environ=environ)
    assert sock.recv(4096) == b"READY=1"
    assert systemd.notify_ready("4 workers ready", environ=environ)
    assert sock.recv(4096) == b"READY=1\nSTATUS=4 workers ready"
    assert systemd.notify_stopping(environ=environ)
    assert sock.recv(4096) == b"STOPPING=1"
    assert systemd.notify_watchdog(environ=environ)
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert systemd.notify_status("reloading\nREADY=1", environ=environ)
    assert sock.recv(4096) == b"STATUS=reloading READY=1"


def test_systemd_notify_reloading_carries_the_monotonic_time(
    receiver: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, environ = receiver
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.notify_reloading(environ=environ)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = sock.recv(4096).decode()
    match = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=([0-9]+)", message)
    assert match is not None, message
    assert before <= int(match[1]) <= after


def test_systemd_reloading_state_with_a_given_time() -> None:
    assert systemd.reloading_state(123456789) == "RELOADING=1\nMONOTONIC_USEC=123456789"


# --------------------------------------------------------------------------------------------
# Watchdog


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": "<self>"}, 2.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<other>"}, None),
    ],
    ids=["unset", "empty", "no-pid", "our-pid", "other-pid"],
)
def test_systemd_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    pids = {"<self>": str(os.getpid()), "<other>": str(os.getpid() + 1)}
    environ = {key: pids.get(value, value) for key, value in environ.items()}
    assert systemd.watchdog_interval_s(environ) == expected


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"WATCHDOG_USEC": "30s"},
            'WATCHDOG_USEC: must be a positive number of microseconds, got "30s"',
        ),
        (
            {"WATCHDOG_USEC": "0"},
            'WATCHDOG_USEC: must be a positive number of microseconds, got "0"',
        ),
        (
            {"WATCHDOG_USEC": "-1"},
            'WATCHDOG_USEC: must be a positive number of microseconds, got "-1"',
        ),
        (
            {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "main"},
            'WATCHDOG_PID: must be a process id, got "main"',
        ),
    ],
)
def test_systemd_watchdog_errors(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SystemdError) as caught:
        systemd.watchdog_interval_s(environ)
    assert str(caught.value) == message


# --------------------------------------------------------------------------------------------
# Socket activation: the environment, checked before any descriptor is looked at


def test_systemd_listen_fds_not_for_us_returns_nothing_and_unsets() -> None:
    environ = {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "sdk:agent"}
    assert systemd.listen_fds(environ) == {}
    assert environ == {}
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "sdk"}
    assert systemd.listen_fds(environ) == {}
    assert environ == {}


def test_systemd_listen_fds_keeps_the_variables_when_asked() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "OTHER": "x"}
    assert systemd.listen_fds(environ, unset=False) == {}
    assert environ == {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "OTHER": "x"}
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "OTHER": "x"}
    assert systemd.listen_fds(environ) == {}
    assert environ == {"OTHER": "x"}


def test_systemd_listen_fds_without_listen_fds_returns_nothing() -> None:
    assert systemd.listen_fds({"LISTEN_PID": str(os.getpid())}) == {}


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"LISTEN_PID": "me"}, 'LISTEN_PID: must be a process id, got "me"'),
        ({"LISTEN_FDS": "two"}, 'LISTEN_FDS: must be a number of descriptors, got "two"'),
        ({"LISTEN_FDS": " 2"}, 'LISTEN_FDS: must be a number of descriptors, got " 2"'),
        (
            {"LISTEN_FDS": "3", "LISTEN_FDNAMES": "sdk:agent"},
            'LISTEN_FDNAMES: 2 names for LISTEN_FDS=3 descriptors, got "sdk:agent"',
        ),
        (
            {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "sdk:agent"},
            'LISTEN_FDNAMES: 2 names for LISTEN_FDS=1 descriptors, got "sdk:agent"',
        ),
        (
            {"LISTEN_FDS": "3", "LISTEN_FDNAMES": "sdk:agent:sdk"},
            'LISTEN_FDNAMES: fds 3 and 5 are both named "sdk" '
            "(give each .socket unit its own FileDescriptorName=)",
        ),
        (
            {"LISTEN_FDS": "2"},
            'LISTEN_FDNAMES: fds 3 and 4 are both named "unknown" '
            "(give each .socket unit its own FileDescriptorName=)",
        ),
    ],
    ids=["pid", "count", "count-space", "fewer-names", "more-names", "duplicate", "unnamed"],
)
def test_systemd_listen_fds_environment_errors(variables: dict[str, str], message: str) -> None:
    environ = {"LISTEN_PID": str(os.getpid()), **variables}
    with pytest.raises(SystemdError) as caught:
        systemd.listen_fds(environ)
    assert str(caught.value) == message
    assert environ == {}, "the variables are unset on an error too"


# --------------------------------------------------------------------------------------------
# Socket activation: real inherited descriptors

#: Runs ``systemd.listen_fds()`` on this process's environment and prints what it got as JSON.
#: With arguments (descriptor numbers), it first moves them to fd 3, 4, ... and sets LISTEN_PID
#: and LISTEN_FDS itself, as systemd does between fork and exec; LISTEN_FDNAMES comes from the
#: parent. With ``ACCEPT=name`` it then accepts one connection on that socket and answers "ok".
CHILD = r"""
import fcntl, json, os, select, socket, sys
from fastproxy import systemd

sources = [int(arg) for arg in sys.argv[1:]]
if sources:
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
    for fd in sources:
        os.close(fd)
    for index, fd in enumerate(high):
        os.dup2(fd, systemd.LISTEN_FDS_START + index)
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ.setdefault("LISTEN_FDS", str(len(sources)))
try:
    passed = systemd.listen_fds()
except systemd.SystemdError as err:
    print(json.dumps({"error": str(err)}))
    sys.exit(0)
left = sorted(name for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if name in os.environ)
print(json.dumps({
    "sockets": {
        name: {
            "fd": sock.fileno(),
            "family": sock.family.name,
            "type": sock.type.name,
            "port": sock.getsockname()[1],
            "blocking": sock.getblocking(),
            "inheritable": sock.get_inheritable(),
        }
        for name, sock in passed.items()
    },
    "left": left,
}), flush=True)
name = os.environ.get("ACCEPT")
if name:
    select.select([passed[name]], [], [], 10)
    conn, _ = passed[name].accept()
    conn.setblocking(True)
    conn.sendall(b"ok")
    conn.close()
"""


def _free_ports(count: int) -> list[int]:
    """Ports nothing listens on now; ``systemd-socket-activate`` refuses port 0."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _socket_activate(ports: list[int], names: str, accept: str) -> tuple[dict[str, object], bytes]:
    """Run the child under the real tool; connect to the ``accept`` socket to start it."""
    args = [SOCKET_ACTIVATE]
    for port in ports:
        args += ["-l", f"127.0.0.1:{port}"]
    args += [f"--fdname={names}", "-E", f"ACCEPT={accept}", sys.executable, "-c", CHILD]
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        listening: dict[int, int] = {}
        while len(listening) < len(ports):
            line = proc.stderr.readline()
            assert line, f"systemd-socket-activate ended early (exit {proc.wait()})"
            found = re.match(r"Listening on 127\.0\.0\.1:(\d+) as (\d+)\.", line)
            if found:
                listening[int(found[1])] = int(found[2])
        assert listening == {port: fd for fd, port in enumerate(ports, 3)}
        # The tool execs the program at the first connection, on any of its sockets.
        port = ports[names.split(":").index(accept)]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            report: dict[str, object] = json.loads(proc.stdout.readline())
            answer = client.recv(16)
        proc.wait(timeout=10)
        return report, answer
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_systemd_socket_activate_is_installed() -> None:
    """The tool the tests below use; a missing tool fails here rather than skipping."""
    assert shutil.which(SOCKET_ACTIVATE), "systemd-socket-activate is missing: install systemd"


def test_systemd_listen_fds_from_systemd_socket_activate() -> None:
    ports = _free_ports(2)
    report, answer = _socket_activate(ports, "sdk:agent", "agent")
    assert report == {
        "sockets": {
            "sdk": {
                "fd": 3,
                "family": "AF_INET",
                "type": "SOCK_STREAM",
                "port": ports[0],
                "blocking": False,
                "inheritable": False,
            },
            "agent": {
                "fd": 4,
                "family": "AF_INET",
                "type": "SOCK_STREAM",
                "port": ports[1],
                "blocking": False,
                "inheritable": False,
            },
        },
        "left": [],
    }
    assert answer == b"ok", "the passed socket is the one the client connected to"


def test_systemd_listen_fds_refuses_a_datagram_socket_from_systemd_socket_activate() -> None:
    [port] = _free_ports(1)
    # -d: a UDP socket; the tool execs at the first datagram, which the connect below never
    # sends, so the child is started by sending one.
    args = [SOCKET_ACTIVATE, "-d", "-l", f"127.0.0.1:{port}", "--fdname=sdk"]
    args += [sys.executable, "-c", CHILD]
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        while not proc.stderr.readline().startswith("Listening on"):
            assert proc.poll() is None, "systemd-socket-activate ended early"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"x", ("127.0.0.1", port))
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert json.loads(out) == {
        "error": 'fd 3 ("sdk"): not a listening TCP socket (a SOCK_DGRAM AF_INET socket)'
    }


def _run_child(fds: list[int], names: str | None, count: str | None = None) -> dict[str, object]:
    """Run the child with ``fds`` moved to 3, 4, ...; ``count`` overrides LISTEN_FDS."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    if names is not None:
        environ["LISTEN_FDNAMES"] = names
    if count is not None:
        environ["LISTEN_FDS"] = count
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, fds)],
        cwd=ROOT,
        env=environ,
        pass_fds=fds,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    report: dict[str, object] = json.loads(result.stdout)
    return report


def test_systemd_listen_fds_inherited_ipv4_and_ipv6_listeners() -> None:
    with socket.socket() as v4, socket.socket(socket.AF_INET6) as v6:
        v4.bind(("127.0.0.1", 0))
        v6.bind(("::1", 0))
        for sock in (v4, v6):
            sock.listen()
        report = _run_child([v6.fileno(), v4.fileno()], "admin:sdk")
        ports = {"admin": v6.getsockname()[1], "sdk": v4.getsockname()[1]}
    sockets = report["sockets"]
    assert isinstance(sockets, dict)
    assert {name: (s["fd"], s["family"], s["port"]) for name, s in sockets.items()} == {
        "admin": (3, "AF_INET6", ports["admin"]),
        "sdk": (4, "AF_INET", ports["sdk"]),
    }
    assert report["left"] == []


def test_systemd_listen_fds_refuses_a_bound_socket_that_does_not_listen() -> None:
    with socket.socket() as listening, socket.socket() as bound:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        bound.bind(("127.0.0.1", 0))
        report = _run_child([listening.fileno(), bound.fileno()], "sdk:agent")
    assert report == {"error": 'fd 4 ("agent"): not a listening TCP socket (not listening)'}


def test_systemd_listen_fds_refuses_a_unix_listener() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="fp-") as directory,
        socket.socket(socket.AF_UNIX) as sock,
    ):
        sock.bind(os.path.join(directory, "s"))
        sock.listen()
        report = _run_child([sock.fileno()], "sdk")
    assert report == {
        "error": 'fd 3 ("sdk"): not a listening TCP socket (a SOCK_STREAM AF_UNIX socket)'
    }


def test_systemd_listen_fds_refuses_a_pipe() -> None:
    read_fd, write_fd = os.pipe()
    try:
        report = _run_child([read_fd], "sdk")
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert report == {"error": 'fd 3 ("sdk"): not a listening TCP socket (not a socket)'}


def test_systemd_listen_fds_refuses_a_descriptor_that_is_not_open() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        report = _run_child([sock.fileno()], "sdk:agent", count="2")
    assert report == {
        "error": 'fd 4 ("agent"): not a listening TCP socket (the descriptor is not open)'
    }


# --------------------------------------------------------------------------------------------
# Pairing passed sockets with listeners (pure: any value stands for a socket)

LISTENERS = ("sdk", "agent")


def test_systemd_match_every_listener_and_admin() -> None:
    activation = systemd.match_listeners({"admin": 5, "agent": 4, "sdk": 3}, LISTENERS, True)
    assert activation == systemd.Activation(
        listeners={"sdk": 3, "agent": 4}, admin=5, to_bind=(), bind_admin=False
    )


def test_systemd_match_some_listeners_the_rest_are_bound() -> None:
    activation = systemd.match_listeners({"agent": 3}, LISTENERS, True)
    assert activation == systemd.Activation(
        listeners={"agent": 3}, admin=None, to_bind=("sdk",), bind_admin=True
    )


def test_systemd_match_nothing_passed_binds_everything() -> None:
    passed: dict[str, int] = {}
    activation = systemd.match_listeners(passed, ("agent", "sdk"), False)
    assert activation == systemd.Activation(
        listeners={}, admin=None, to_bind=("agent", "sdk"), bind_admin=False
    )


def test_systemd_match_a_listener_named_admin_when_admin_is_off() -> None:
    activation = systemd.match_listeners({"admin": 3}, ("admin", "sdk"), False)
    assert activation == systemd.Activation(
        listeners={"admin": 3}, admin=None, to_bind=("sdk",), bind_admin=False
    )


@pytest.mark.parametrize(
    ("passed", "names", "admin", "message"),
    [
        (
            {"sdk": 3, "web": 4},
            LISTENERS,
            True,
            'socket "web" (FileDescriptorName=web) names no listener; '
            "the listeners are: sdk, agent, admin",
        ),
        (
            {"fastproxy-sdk.socket": 3},
            LISTENERS,
            False,
            'socket "fastproxy-sdk.socket" (FileDescriptorName=fastproxy-sdk.socket) names no '
            "listener; the listeners are: sdk, agent",
        ),
        (
            {"admin": 3},
            LISTENERS,
            False,
            'socket "admin" (FileDescriptorName=admin) names no listener; '
            "the listeners are: sdk, agent (the admin listener is off: admin = false)",
        ),
        (
            {"admin": 3},
            ("admin", "sdk"),
            True,
            'socket "admin": both the admin listener and listeners.admin have this name '
            "(rename the listener to pass it a socket)",
        ),
    ],
    ids=["unknown", "default-name", "admin-off", "admin-ambiguous"],
)
def test_systemd_match_errors(
    passed: dict[str, int], names: tuple[str, ...], admin: bool, message: str
) -> None:
    with pytest.raises(SystemdError) as caught:
        systemd.match_listeners(passed, names, admin)
    assert str(caught.value) == message
