"""Upstream health: the up/down state of every server, decided once per host.

[pure] Imports ``config`` only; no socket, no clock (times are passed in), no logging. The
master owns one ``HealthBoard``; ``checker.py`` runs the active checks on the master's selector
and feeds their results here, the workers report passive failures over the control channel
(``control.ServerDown``), and every change goes back to each worker as the whole table
(``control.Health``), which the workers' pools follow.

Theory of operation
-------------------
A server is *up* when its active checks say so and no passive mark holds it down.

- Active (``HealthCheck``, HAProxy's ``rise``/``fall``): every ``interval_s`` one ``GET <path>``;
  a status line within ``timeout_s`` whose status is in ``statuses`` passes, anything else
  (refused, reset, timeout, no status line, another status) fails. ``fall`` failures in a row
  mark an up server down, ``rise`` passes in a row bring a down server back. Servers start up:
  a dead one is caught by the first request's failed connect (passive) or by ``fall`` checks.
- Passive (nginx's ``max_fails=1 fail_timeout``): a failed connect, a connect timeout or a reset
  before any response byte, seen by any worker, marks the server down for ``down_for_s``. A
  check that *started after* the mark and passes lifts it at once, so a restored server is back
  within one interval; without active checks the mark simply expires.
- Like nginx, a passive mark never takes down the only server of an upstream without active
  checks: with nothing to bring it back early, a blip would refuse every request for
  ``down_for_s``. (With checks, one interval at most.)

Invariants: the table is keyed by ``(upstream, server label)``; ``sync`` follows a reload's server
set and keeps the state of servers that stay; ``version`` grows with every change of a server's
effective state, which is what the master broadcasts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fastproxy.config import HealthCheck, UpstreamConfig, UpstreamTls

#: longest status line read from a check's answer
MAX_STATUS_LINE_BYTES = 1024


def active_check(spec: UpstreamConfig) -> HealthCheck | None:
    """The active checks of an upstream's servers, None when there are none (``health =
    false``). An upstream with ``tls`` is checked over TLS, with its own settings."""
    return spec.health


def passive_applies(spec: UpstreamConfig) -> bool:
    """Whether a passive failure marks a server down: not for the only server of an upstream
    without active checks (nginx's rule), since nothing would bring it back early."""
    return active_check(spec) is not None or len(spec.servers) > 1


def parse_status_line(data: bytes) -> int | None:
    """The status of ``HTTP/1.x NNN reason`` (``data`` up to, not including, its CRLF), or None
    when it is not one."""
    if len(data) < 12 or data[:7] != b"HTTP/1." or data[8:9] != b" ":
        return None
    if data[7:8] not in (b"0", b"1"):
        return None
    code = data[9:12]
    if not code.isdigit() or (len(data) > 12 and data[12:13] != b" "):
        return None
    return int(code)


def status_passes(status: int, statuses: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= status <= hi for lo, hi in statuses)


@dataclass(frozen=True, slots=True)
class Change:
    """A server's effective state changed: what the master logs and broadcasts."""

    upstream: str
    server: str
    up: bool
    #: why, for the log line ("2 checks failed: connection refused", "check passed", ...)
    reason: str


@dataclass(slots=True)
class ServerHealth:
    """One server's health as the master sees it."""

    upstream: str
    label: str
    host: str
    port: int
    check: HealthCheck | None
    #: the upstream's TLS settings: checks run over TLS with them (None: plain HTTP)
    tls: UpstreamTls | None
    down_for_s: float
    #: passive marks apply (see the module notes)
    passive: bool
    #: the verdict of the active checks
    checked_up: bool = True
    #: consecutive passing and failing checks
    passes: int = 0
    fails: int = 0
    #: a passive mark: down until ``passive_until`` (0: none), set at ``passive_at``
    passive_until: float = 0.0
    passive_at: float = 0.0
    #: when the next check is due, and when the one under way started (None: none)
    next_check: float = 0.0
    check_started: float | None = None

    @property
    def up(self) -> bool:
        return self.checked_up and not self.passive_until

    @property
    def key(self) -> tuple[str, str]:
        return (self.upstream, self.label)


class HealthBoard:
    """Every server's health; times are ``time.monotonic()`` values passed in."""

    def __init__(self) -> None:
        self.servers: dict[tuple[str, str], ServerHealth] = {}
        #: grows with every change of a server's effective state
        self.version = 0

    def sync(self, upstreams: Mapping[str, UpstreamConfig], now: float) -> list[Change]:
        """Follow a generation's server set: keep the state of servers that stay (with the new
        settings), add new ones up and due for a check now, drop the others."""
        old = self.servers
        new: dict[tuple[str, str], ServerHealth] = {}
        for name, spec in upstreams.items():
            check = active_check(spec)
            passive = passive_applies(spec)
            for address in spec.servers:
                label = str(address)
                state = old.get((name, label))
                if state is None:
                    state = ServerHealth(
                        name, label, address.host, address.port, check, spec.tls,
                        spec.down_for_s, passive, next_check=now,
                    )  # fmt: skip
                else:
                    if state.check != check or state.tls != spec.tls:
                        state.next_check = now
                    state.check = check
                    state.tls = spec.tls
                    state.down_for_s = spec.down_for_s
                    state.passive = passive
                new[(name, label)] = state
        changes = []
        for key, state in new.items():
            was_up = state.up if key in old else True
            if state.check is None:
                state.checked_up = True  # checks turned off: their verdict no longer counts
                state.passes = state.fails = 0
                state.check_started = None
            if not state.passive:
                state.passive_until = 0.0
            if state.up != was_up:
                changes.append(Change(state.upstream, state.label, state.up, "settings changed"))
        if changes or set(new) != set(old):
            self.version += 1
        self.servers = new
        return changes

    def due(self, now: float) -> list[ServerHealth]:
        """Servers whose check is due and not under way."""
        return [
            s
            for s in self.servers.values()
            if s.check is not None and s.check_started is None and s.next_check <= now
        ]

    def check_started(self, state: ServerHealth, now: float) -> None:
        assert state.check is not None
        state.check_started = now
        state.next_check = now + state.check.interval_s

    def check_done(self, state: ServerHealth, ok: bool, detail: str) -> Change | None:
        """A check of ``state`` ended; the change of its effective state, if any."""
        started = state.check_started
        state.check_started = None
        check = state.check
        if started is None or check is None or self.servers.get(state.key) is not state:
            return None  # a check of a server a reload removed, or whose checks were turned off
        was_up = state.up
        if ok:
            state.passes += 1
            state.fails = 0
            if not state.checked_up and state.passes >= check.rise:
                state.checked_up = True
            if state.passive_until and started >= state.passive_at:
                state.passive_until = 0.0
            reason = "check passed"
        else:
            state.fails += 1
            state.passes = 0
            if state.checked_up and state.fails >= check.fall:
                state.checked_up = False
            reason = f"{state.fails} check{'s' if state.fails != 1 else ''} failed: {detail}"
        return self._changed(state, was_up, reason)

    def passive_failure(self, upstream: str, label: str, detail: str, now: float) -> Change | None:
        """A worker saw ``label`` fail (connect refused or timed out, reset before any byte)."""
        state = self.servers.get((upstream, label))
        if state is None or not state.passive:
            return None
        was_up = state.up
        state.passive_until = now + state.down_for_s
        state.passive_at = now
        return self._changed(state, was_up, f"{detail} (passive, for {state.down_for_s:g} s)")

    def expire(self, now: float) -> list[Change]:
        """Lift the passive marks whose time is over."""
        changes = []
        for state in self.servers.values():
            if state.passive_until and state.passive_until <= now:
                was_up = state.up
                state.passive_until = 0.0
                change = self._changed(state, was_up, "passive mark expired")
                if change is not None:
                    changes.append(change)
        return changes

    def next_event(self) -> float | None:
        """The earliest time a check is due or a passive mark expires (None: nothing planned)."""
        times = [
            s.next_check
            for s in self.servers.values()
            if s.check is not None and s.check_started is None
        ]
        times += [s.passive_until for s in self.servers.values() if s.passive_until]
        return min(times) if times else None

    def table(self) -> dict[str, dict[str, bool]]:
        """``{upstream: {server: up}}``, what every worker gets."""
        out: dict[str, dict[str, bool]] = {}
        for state in self.servers.values():
            out.setdefault(state.upstream, {})[state.label] = state.up
        return out

    def _changed(self, state: ServerHealth, was_up: bool, reason: str) -> Change | None:
        if state.up == was_up:
            return None
        self.version += 1
        return Change(state.upstream, state.label, state.up, reason)
