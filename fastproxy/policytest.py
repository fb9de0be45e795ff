"""Policy cases (SPEC 10): load a cases file and run each case through the worker's exchange.

Imports ``config``, ``errors``, ``exchange``, ``http1`` and ``runtime``; never asyncio, sockets,
``worker`` or ``master``. ``cli`` (``fastproxy test``) prints the results and chooses the exit
code; this module neither prints nor exits.

A cases file is TOML::

    config = "fastproxy.toml"      # optional, relative to this file; -c wins; none: the preset

    [[case]]
    name = "sdk: devices API"      # optional (default: "LISTENER: REQUEST")
    listener = "sdk"
    request = "GET /api/1/devices/abc?x=1"   # METHOD TARGET; a bare target is GET
    headers = { Content-Length = "5" }       # optional; Host defaults as ``explain``'s does
    websocket = true               # optional: add a valid WebSocket opening handshake
    expect = { decision = "forward", rule = "api-devices", target = "/api/1/devices/abc?x=1" }

``expect`` holds at least one of ``decision`` (a ``Verdict`` value), ``status`` (the status
fastproxy answers itself; a forwarded request has none), ``code`` (the stable JSON error code),
``rule``, ``target`` (the request target sent upstream), ``upstream`` and ``location`` (of a
redirect). Only the keys given are compared.

Invariants: a case runs through the code a worker runs: its request, as bytes, is fed to an
``exchange.Exchange`` (head scanner, ``admit``, local answers, the request written upstream) on
the listener's ``runtime.ListenerPlan``, with this module's recording I/O in place of sockets,
timers and pools; the target compared is read back from the bytes written to the upstream, and
nothing here re-implements a policy. The h11 leg parses the head (the reference parser; the
decision does not depend on it). Every mistake in the file is a ``ConfigError`` naming the file,
the key (``case[3].expect.decision``) and the value.
"""

from __future__ import annotations

import base64
import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fastproxy.config import Config, UpstreamConfig
from fastproxy.errors import ConfigError
from fastproxy.exchange import Cycle, Exchange, UpstreamConn, Verdict
from fastproxy.http1 import ClientLeg, ServerLeg, UpstreamLeg
from fastproxy.runtime import ListenerPlan, Snapshot

#: the keys ``expect`` may hold, in the order a report shows them
EXPECT_KEYS = ("decision", "status", "code", "rule", "target", "upstream", "location")
#: the keys a case may hold
CASE_KEYS = ("name", "listener", "request", "headers", "websocket", "expect")
#: the top-level keys of a cases file
FILE_KEYS = ("config", "case")
#: a decision's words, the ``decision`` label of metrics and the access log
DECISIONS = tuple(verdict.value for verdict in Verdict)

#: RFC 9110 5.6.2 token, the grammar of a method and of a header name
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: the client address every case comes from (TEST-NET-1, never trusted)
_PEER = b"192.0.2.1"
#: the handshake ``websocket = true`` adds (RFC 6455's example key)
_WEBSOCKET_HEADERS = (
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Version", b"13"),
    (b"Sec-WebSocket-Key", base64.b64encode(b"the sample nonce")),
)


@dataclass(frozen=True, slots=True)
class Case:
    """One case of a cases file."""

    index: int
    name: str
    listener: str
    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    expect: Mapping[str, str | int]


@dataclass(frozen=True, slots=True)
class CasesFile:
    """A loaded cases file: its path, the configuration it names (if any) and its cases."""

    path: str
    config: str | None
    cases: tuple[Case, ...]


@dataclass(frozen=True, slots=True)
class Result:
    """One case run: what it expected and what the proxy does, for the keys it expected."""

    case: Case
    got: Mapping[str, str | int]

    @property
    def mismatches(self) -> list[tuple[str, str | int, str | int]]:
        """``(key, expected, got)`` for every expected key the proxy does otherwise."""
        return [
            (key, want, self.got[key])
            for key, want in self.case.expect.items()
            if self.got[key] != want
        ]

    @property
    def passed(self) -> bool:
        return not self.mismatches


def parse_request(text: str) -> tuple[bytes, bytes]:
    """Split ``'METHOD TARGET'`` (a bare target is read as GET) into bytes, or raise ValueError."""
    parts = text.split()
    if len(parts) == 3 and parts[2].startswith("HTTP/"):
        parts = parts[:2]
    if len(parts) == 1:
        parts = ["GET", parts[0]]
    if len(parts) != 2:
        raise ValueError(f"expected 'METHOD TARGET', got {text!r}")
    method, target = parts
    if not _TOKEN.fullmatch(method):
        raise ValueError(f"not an HTTP method: {method!r}")
    # fsencode: arguments that were not valid UTF-8 get their original bytes back, so a raw
    # non-ASCII byte reaches the policy as it would arrive on the wire.
    return method.encode("ascii"), os.fsencode(target)


def _show(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _bad(where: str, what: str, value: object, hint: str | None = None) -> ConfigError:
    return ConfigError(f"{what}, got {_show(value)}", where=where, hint=hint)


def _unknown_keys(table: Mapping[str, object], known: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f'did you mean "{close[0]}"?' if close else "known: " + ", ".join(known)
            raise _bad(where, "unknown key", key, hint)


def _string(table: Mapping[str, object], key: str, where: str) -> str:
    value = table[key]
    if not isinstance(value, str) or not value:
        raise _bad(f"{where}.{key}" if where else key, "must be a non-empty string", value)
    return value


def load_cases(path: str) -> CasesFile:
    """Read and check the cases file at ``path``; raise ``ConfigError`` naming what is wrong."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as err:
        raise ConfigError(
            f"cannot read the file: {err.strerror or err}", where="", source=path
        ) from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"not valid TOML: {err}", where="", source=path) from None
    try:
        return _cases_file(path, data)
    except ConfigError as err:
        raise err.with_source(path) from None


def _cases_file(path: str, data: Mapping[str, object]) -> CasesFile:
    _unknown_keys(data, FILE_KEYS, "")
    config_path = None
    if "config" in data:
        config_path = str(Path(path).parent / _string(data, "config", ""))
    raw_cases = data.get("case")
    if not isinstance(raw_cases, list) or not raw_cases:
        if raw_cases is None:
            raise ConfigError("no [[case]] table: a cases file holds one or more", where="case")
        raise _bad("case", "must be one or more [[case]] tables", raw_cases)
    cases = []
    names: dict[str, int] = {}
    for index, raw in enumerate(raw_cases, 1):
        case = _case(index, raw)
        named = isinstance(raw, dict) and "name" in raw  # a default name may repeat
        if named and case.name in names:
            raise _bad(
                f"case[{index}].name",
                f"the same name as case[{names[case.name]}]",
                case.name,
                "give each case a name of its own",
            )
        if named:
            names[case.name] = index
        cases.append(case)
    return CasesFile(path, config_path, tuple(cases))


def _case(index: int, raw: object) -> Case:
    where = f"case[{index}]"
    if not isinstance(raw, dict):
        raise _bad(where, "must be a table", raw)
    _unknown_keys(raw, CASE_KEYS, where)
    for key in ("listener", "request", "expect"):
        if key not in raw:
            raise ConfigError(f'missing key "{key}"', where=where)
    listener = _string(raw, "listener", where)
    request = _string(raw, "request", where)
    try:
        method, target = parse_request(request)
    except ValueError as err:
        raise _bad(f"{where}.request", str(err).partition(",")[0], request) from None
    headers = _headers(raw.get("headers", {}), f"{where}.headers")
    websocket = raw.get("websocket", False)
    if not isinstance(websocket, bool):
        raise _bad(f"{where}.websocket", "must be true or false", websocket)
    if websocket:
        headers += _WEBSOCKET_HEADERS
    name = _string(raw, "name", where) if "name" in raw else f"{listener}: {request}"
    expect = _expect(raw["expect"], f"{where}.expect")
    return Case(index, name, listener, method, target, headers, expect)


def _headers(raw: object, where: str) -> tuple[tuple[bytes, bytes], ...]:
    if not isinstance(raw, dict):
        raise _bad(where, "must be a table of header names and values", raw)
    headers = []
    for name, value in raw.items():
        if not _TOKEN.fullmatch(name):
            raise _bad(where, "not a header name", name)
        if not isinstance(value, str) or not value.isascii() or "\r" in value or "\n" in value:
            raise _bad(f"{where}.{name}", "must be a string of ASCII without line breaks", value)
        headers.append((name.encode("ascii"), value.encode("ascii")))
    return tuple(headers)


def _expect(raw: object, where: str) -> dict[str, str | int]:
    if not isinstance(raw, dict) or not raw:
        raise _bad(where, "must be a table with at least one of " + ", ".join(EXPECT_KEYS), raw)
    _unknown_keys(raw, EXPECT_KEYS, where)
    expect: dict[str, str | int] = {}
    for key in EXPECT_KEYS:
        if key not in raw:
            continue
        value = raw[key]
        if key == "status":
            if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
                raise _bad(f"{where}.status", "must be an HTTP status from 100 to 599", value)
        elif not isinstance(value, str) or not value:
            raise _bad(f"{where}.{key}", "must be a non-empty string", value)
        elif key == "decision" and value not in DECISIONS:
            close = difflib.get_close_matches(value, DECISIONS, n=1)
            hint = f'did you mean "{close[0]}"?' if close else "known: " + ", ".join(DECISIONS)
            raise _bad(f"{where}.decision", "unknown decision", value, hint)
        expect[key] = value
    return expect


def check_listeners(cases: CasesFile, cfg: Config) -> None:
    """Raise ``ConfigError`` for a case naming a listener the configuration does not have."""
    for case in cases.cases:
        if case.listener not in cfg.listeners:
            known = sorted(cfg.listeners)
            close = difflib.get_close_matches(case.listener, known, n=1)
            hint = f'did you mean "{close[0]}"?' if close else "known: " + ", ".join(known)
            where = f"case[{case.index}].listener"
            raise _bad(where, f"no such listener in {cfg.source}", case.listener, hint).with_source(
                cases.path
            )


def run_case(snapshot: Snapshot, case: Case) -> Result:
    """What the worker does with ``case``'s request on its listener: the request's bytes fed to
    an ``exchange.Exchange`` whose I/O is recorded (``_CaseRun``)."""
    plan = snapshot.listeners[case.listener]
    headers = list(case.headers)
    if not any(name.lower() == b"host" for name, _ in headers):
        host = plan.table.decide(case.target).authority or str(plan.config.bind).encode()
        headers.insert(0, (b"Host", host))
    head = b"%s %s HTTP/1.1\r\n" % (case.method, case.target)
    head += b"".join(b"%s: %s\r\n" % field for field in headers) + b"\r\n"
    run = _CaseRun(snapshot, plan)
    run.exchange.client_data(head, 0.0)
    run.run()
    return Result(case, run.outcome())


class _Upstream:
    """The ``UpstreamConn`` a case's exchange writes its request to: kept, never answered."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.leg = UpstreamLeg()
        self.reused = False
        self.config = config
        self.wire = bytearray()

    def write(self, data: bytes) -> None:
        self.wire += data

    def writelines(self, data: list[bytes]) -> None:
        for part in data:
            self.wire += part

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def release(self) -> None:
        pass

    def discard(self) -> None:
        pass

    def mark_failed(self) -> None:
        pass

    def close(self) -> None:
        pass


class _CaseRun:
    """One client connection of one case: a real ``Exchange`` whose ``ExchangeIO``, worker and
    listener are this object. Client bytes and upstream writes are recorded; timers never fire
    (the request arrives whole), ``soon`` runs in ``run``."""

    def __init__(self, snapshot: Snapshot, plan: ListenerPlan) -> None:
        # the WorkerView and PlanHolder of the exchange
        self.leg_class: Callable[[int], ClientLeg] = ServerLeg
        self.default_hosts = snapshot.default_hosts
        self.plan = plan
        self.upstreams = snapshot.upstreams
        self.client = bytearray()
        self.queue: list[Callable[[float], None]] = []
        self.finished_as: tuple[Cycle | None, int, str] | None = None
        self.upstream: _Upstream | None = None
        self.exchange = Exchange(self, self, self)
        self.exchange.open(_PEER)

    def next_request_id(self) -> bytes:
        return b"policy-test"

    def run(self) -> None:
        while self.queue:
            self.queue.pop(0)(0.0)

    def outcome(self) -> dict[str, str | int]:
        """The comparable facts of the case: ``-`` where there is none."""
        if self.finished_as is not None:
            # answered by fastproxy (a forwarded request is never answered here)
            cycle, status, code = self.finished_as
            decision = cycle.decision if cycle is not None else None
            location = b""
            for line in bytes(self.client).split(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"location":
                    location = value.strip()
            return {
                "decision": cycle.verdict.value if cycle is not None else Verdict.REJECT.value,
                "status": status,
                "code": code or "-",
                "rule": decision.rule.name if decision is not None else "-",
                "target": "-",
                "upstream": "-",
                "location": _text(location) or "-",
            }
        cycle = self.exchange.cycle
        upstream = self.upstream
        if cycle is None or cycle.decision is None or upstream is None:
            # neither answered nor forwarded: nothing the exchange does with a whole head
            return dict.fromkeys(EXPECT_KEYS, "none (no answer)")
        request_line = bytes(upstream.wire).partition(b"\r\n")[0]
        return {
            "decision": cycle.verdict.value,
            "status": "none (forwarded)",
            "code": "-",
            "rule": cycle.decision.rule.name,
            "target": _text(request_line.split(b" ")[1]),
            "upstream": cycle.upstream_name,
            "location": "-",
        }

    # -- ExchangeIO

    def write_client(self, data: bytes) -> None:
        self.client += data

    def writelines_client(self, data: list[bytes]) -> None:
        for part in data:
            self.client += part

    def close_client(self, abort: bool) -> None:
        pass

    def set_reading(self, reading: bool) -> None:
        pass

    def open_upstream(self, upstream: str, fresh: bool) -> UpstreamConn | None:
        self.upstream = _Upstream(self.upstreams[upstream])
        return self.upstream

    def arm(self, delay: float) -> None:
        pass

    def cancel_timer(self) -> None:
        pass

    def soon(self, callback: Callable[[float], None]) -> None:
        self.queue.append(callback)

    def finished(self, cycle: Cycle | None, status: int, code: str) -> None:
        if self.finished_as is None:
            self.finished_as = (cycle, status, code)

    def upstream_error(self, upstream: str, code: str, detail: str) -> None:
        pass

    def switched(
        self, cycle: Cycle, conn: UpstreamConn, client_rest: bytes, upstream_rest: bytes
    ) -> None:
        pass


def _text(value: bytes) -> str:
    return value.decode("ascii", "backslashreplace")


def run_cases(cfg: Config, cases: CasesFile) -> list[Result]:
    """Every case of ``cases`` against ``cfg``, in file order."""
    check_listeners(cases, cfg)
    snapshot = Snapshot.build(cfg, 1)
    return [run_case(snapshot, case) for case in cases.cases]
