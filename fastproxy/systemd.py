"""systemd integration in pure Python: readiness notification, watchdog, socket activation.

Imports ``errors`` only, and the standard library; never asyncio, never libsystemd. The master is
the only caller: it sends every notification (``NotifyAccess=main``) and receives the activated
sockets before it forks.

Theory of operation
-------------------
- ``notify`` sends one datagram to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract
  socket), as sd_notify(3) does. The ``notify_*`` helpers send the messages fastproxy uses:
  ``READY=1``, ``RELOADING=1`` with ``MONOTONIC_USEC`` (systemd 253 ``Type=notify-reload``
  semantics, accepted by ``Type=notify`` too), ``STOPPING=1``, ``STATUS=``, ``WATCHDOG=1``.
- ``watchdog_interval_s`` reads ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``) as
  sd_watchdog_enabled(3) does; the caller pings at half that interval.
- ``listen_fds`` takes the sockets passed by socket activation as sd_listen_fds_with_names(3)
  does: ``LISTEN_PID`` must be this process, ``LISTEN_FDS`` descriptors start at fd 3, and
  ``LISTEN_FDNAMES`` names each one (``FileDescriptorName=`` of its ``.socket`` unit).
- ``match_listeners`` pairs the passed sockets with the configured listeners by name, never by
  position: systemd does not promise an order across socket units.

Invariants:

- ``notify`` never raises for an unset, missing or unreachable socket: it returns False and the
  caller decides whether to log. It never blocks for longer than ``NOTIFY_TIMEOUT_S``.
- Every inconsistency in what systemd passed (or a person set by hand) is one ``SystemdError``
  whose text names the variable or descriptor and the value.
- ``listen_fds`` returns only listening IPv4/IPv6 stream sockets, non-blocking (what
  ``master.bind_listener`` returns) and close-on-exec, as sd_listen_fds(3) asks of its callers.
- ``match_listeners`` touches no socket: it only pairs names, so it is tested with any values.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from fastproxy.errors import FastproxyError

#: the first descriptor socket activation passes (SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3
#: the name (``FileDescriptorName=``) of the admin listener's socket
ADMIN_NAME = "admin"
#: longest a notification may wait for room in systemd's queue; the master's loop must go on
NOTIFY_TIMEOUT_S = 1.0

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
LISTEN_PID = "LISTEN_PID"
LISTEN_FDS = "LISTEN_FDS"
LISTEN_FDNAMES = "LISTEN_FDNAMES"

T = TypeVar("T")


class SystemdError(FastproxyError):
    """What systemd passed in the environment is unusable; ``str()`` names what and the value."""


# --------------------------------------------------------------------------------------------
# Notification


def notify(state: str, *, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (``KEY=VALUE`` lines) to ``$NOTIFY_SOCKET``; True when it was sent.

    False when the variable is unset or empty, names no usable address, or the send failed.
    """
    address = _notify_address(environ.get(NOTIFY_SOCKET, ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(NOTIFY_TIMEOUT_S)
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True


def _notify_address(value: str) -> str | bytes | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Linux abstract namespace: a leading NUL byte instead of the "@"
        return b"\0" + value[1:].encode()
    # Unset, empty, relative, or a kind this module does not speak (systemd 253 "vsock:")
    return None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock systemd compares ``MONOTONIC_USEC`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading_state(usec: int | None = None) -> str:
    """``RELOADING=1`` and the time it started; systemd 253 discards stale reload messages."""
    return f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec() if usec is None else usec}"


def status_state(text: str) -> str:
    """``STATUS=text`` on one line: a newline in ``text`` would start another assignment."""
    return "STATUS=" + " ".join(text.splitlines())


def notify_ready(status: str | None = None, *, environ: Mapping[str, str] = os.environ) -> bool:
    """Every worker accepts (also the end of a reload); ``status`` shows in systemctl status."""
    state = "READY=1" if status is None else "READY=1\n" + status_state(status)
    return notify(state, environ=environ)


def notify_reloading(*, environ: Mapping[str, str] = os.environ) -> bool:
    """A reload started; ``notify_ready`` ends it."""
    return notify(reloading_state(), environ=environ)


def notify_stopping(*, environ: Mapping[str, str] = os.environ) -> bool:
    """The graceful stop started."""
    return notify("STOPPING=1", environ=environ)


def notify_status(text: str, *, environ: Mapping[str, str] = os.environ) -> bool:
    """A one-line status for ``systemctl status``."""
    return notify(status_state(text), environ=environ)


def notify_watchdog(*, environ: Mapping[str, str] = os.environ) -> bool:
    """The master's loop is alive."""
    return notify("WATCHDOG=1", environ=environ)


def watchdog_interval_s(environ: Mapping[str, str] = os.environ) -> float | None:
    """The watchdog timeout (``WatchdogSec=``) in seconds, or None when none is set for us.

    None when ``WATCHDOG_USEC`` is unset or ``WATCHDOG_PID`` names another process (a child that
    inherited the environment). The caller sends ``WATCHDOG=1`` every half of this interval.
    """
    usec_text = environ.get(WATCHDOG_USEC)
    if not usec_text:
        return None
    usec = _number(WATCHDOG_USEC, usec_text, "a positive number of microseconds")
    if usec == 0:
        raise SystemdError(
            f'{WATCHDOG_USEC}: must be a positive number of microseconds, got "{usec_text}"'
        )
    pid_text = environ.get(WATCHDOG_PID)
    if pid_text and _number(WATCHDOG_PID, pid_text, "a process id") != os.getpid():
        return None
    return usec / 1_000_000


def _number(name: str, text: str, what: str) -> int:
    # int() would accept " 3", "+3", "3_0" and non-ASCII digits; systemd writes plain digits.
    if not (text.isascii() and text.isdigit()):
        raise SystemdError(f'{name}: must be {what}, got "{text}"')
    return int(text)


# --------------------------------------------------------------------------------------------
# Socket activation


def listen_fds(
    environ: MutableMapping[str, str] = os.environ, *, unset: bool = True
) -> dict[str, socket.socket]:
    """The sockets socket activation passed to this process, by ``FileDescriptorName=``.

    Empty when ``LISTEN_PID`` or ``LISTEN_FDS`` is unset or ``LISTEN_PID`` is another process.
    With ``unset``, the three variables are removed whatever the outcome, so that nothing this
    process starts takes them for its own.
    """
    try:
        return _listen_fds(environ)
    finally:
        if unset:
            for name in (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES):
                environ.pop(name, None)


def _listen_fds(environ: Mapping[str, str]) -> dict[str, socket.socket]:
    pid_text = environ.get(LISTEN_PID)
    if pid_text is None:
        return {}
    if _number(LISTEN_PID, pid_text, "a process id") != os.getpid():
        return {}
    count_text = environ.get(LISTEN_FDS)
    if count_text is None:
        return {}
    count = _number(LISTEN_FDS, count_text, "a number of descriptors")
    names_text = environ.get(LISTEN_FDNAMES)
    # Without LISTEN_FDNAMES every descriptor is "unknown", as in sd_listen_fds_with_names(3).
    names = ["unknown"] * count if names_text is None else names_text.split(":")
    if len(names) != count:
        raise SystemdError(
            f"{LISTEN_FDNAMES}: {len(names)} names for {LISTEN_FDS}={count} descriptors, "
            f'got "{names_text}"'
        )
    first: dict[str, int] = {}
    for fd, name in enumerate(names, LISTEN_FDS_START):
        if name in first:
            raise SystemdError(
                f'{LISTEN_FDNAMES}: fds {first[name]} and {fd} are both named "{name}" '
                f"(give each .socket unit its own FileDescriptorName=)"
            )
        first[name] = fd
    # Every descriptor is checked before any is wrapped: a socket object closes its descriptor
    # when collected, and on an error none of them is this module's to close.
    for name, fd in first.items():
        _check_listening(fd, name)
    sockets: dict[str, socket.socket] = {}
    for name, fd in first.items():
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets[name] = sock
    return sockets


def _check_listening(fd: int, name: str) -> None:
    """Raise unless ``fd`` is a listening IPv4 or IPv6 stream socket."""
    problem = _listening_problem(fd)
    if problem:
        raise SystemdError(f'fd {fd} ("{name}"): not a listening TCP socket ({problem})')


def _listening_problem(fd: int) -> str:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return "the descriptor is not open"
    if not stat.S_ISSOCK(mode):
        return "not a socket"
    probe = socket.socket(fileno=fd)
    try:
        if probe.family not in (socket.AF_INET, socket.AF_INET6) or probe.type != (
            socket.SOCK_STREAM
        ):
            return f"a {probe.type.name} {probe.family.name} socket"
        if not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "not listening"
        return ""
    finally:
        probe.detach()


@dataclass(frozen=True, slots=True)
class Activation(Generic[T]):
    """What socket activation provides, paired with the configured listeners."""

    #: listener name -> its passed socket
    listeners: dict[str, T]
    #: the admin listener's passed socket
    admin: T | None
    #: listeners with no passed socket: bound by the master as usual, in configuration order
    to_bind: tuple[str, ...]
    #: the admin listener is configured and has no passed socket
    bind_admin: bool


def match_listeners(
    passed: Mapping[str, T], listener_names: Iterable[str], admin: bool
) -> Activation[T]:
    """Pair ``passed`` sockets with listeners by name; ``admin`` is the admin listener's name.

    ``admin`` says whether the admin listener is configured. A passed socket that names no
    listener is a ``SystemdError``: binding elsewhere what the operator meant to pass would
    serve a port nobody watches.
    """
    names = list(listener_names)
    if admin and ADMIN_NAME in names and ADMIN_NAME in passed:
        raise SystemdError(
            f'socket "{ADMIN_NAME}": both the admin listener and listeners.{ADMIN_NAME} have '
            f"this name (rename the listener to pass it a socket)"
        )
    known = [*names, ADMIN_NAME] if admin else names
    for name in passed:
        if name not in known:
            hint = " (the admin listener is off: admin = false)" if name == ADMIN_NAME else ""
            raise SystemdError(
                f'socket "{name}" (FileDescriptorName={name}) names no listener; '
                f"the listeners are: {', '.join(known)}{hint}"
            )
    return Activation(
        listeners={name: passed[name] for name in names if name in passed},
        admin=passed.get(ADMIN_NAME) if admin else None,
        to_bind=tuple(name for name in names if name not in passed),
        bind_admin=admin and ADMIN_NAME not in passed,
    )
