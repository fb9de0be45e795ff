"""Run every adversarial case against the real proxy (master and workers) on every listener.

One recording upstream and one proxy with the default configuration (the Cobrowse preset on
both listeners) serve the whole module; cases that need short client timeouts get a second
proxy (``proxy = "slow"``), started on first use. Each case is sent over a raw socket; then,
besides the case's own expected responses, the runner asserts on what reached the upstream:

(a) the requests the upstream parsed are exactly the ones the case expects, with the exact
    canonical targets, in order;
(b) every lenient reading of each upstream connection's raw bytes (``lenient.READINGS``) finds
    as many requests as the upstream parsed there, and every lenient reading of each request's
    path (``lenient.lenient_paths``), and of any URL override header, stays inside the
    listener's allowed prefixes; no byte is left that no reading can parse;
(c) on the sdk listener no override header reaches the upstream, in any spelling, and on no
    listener does one turn a request into a method fastproxy refuses (TRACE, CONNECT);
(d) no NUL, CR or LF inside a forwarded header line;
(e) after an upstream switched protocols, its bytes are well-formed masked WebSocket frames if
    the client got its 101, and nothing at all otherwise.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest
from support.client import ConnectionClosedError, HttpConnection, Response
from support.proxy import ProxyFactory, RunningProxy
from support.upstream import HEALTH_TARGET, RecordedConnection, RecordedRequest

from adversarial.backend import CorpusUpstream
from adversarial.corpus import (
    LISTENERS,
    Case,
    CorpusError,
    Step,
    load_all,
    load_file,
    parse_outcome,
)
from adversarial.lenient import (
    ALLOWED_PREFIXES,
    METHOD_OVERRIDE_HEADERS,
    PROVENANCE_READ,
    READINGS,
    REFUSED_METHODS,
    STRICT,
    URL_OVERRIDE_HEADERS,
    WebSocketFault,
    escaping_paths,
    fold_name,
    head_line_faults,
    read_requests,
    websocket_frames,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

CASES = load_all()
#: categories the corpus must cover
CATEGORIES = {
    "path",
    "request_line",
    "smuggling",
    "pipelining",
    "websocket",
    "h2c",
    "headers",
    "host",
    "limits",
    "provenance",
    "methods",
    "agent",
    "response",
}
#: short client timeouts for the slow-client cases
SLOW_LIMITS = {"header_timeout_s": 0.5, "keepalive_timeout_s": 0.5}
CLIENT_TIMEOUT_S = 5.0
#: the upstream is settled once nothing changed for this long
QUIET_S = 0.02
SETTLE_LIMIT_S = 2.0


# -- fixtures -------------------------------------------------------------------------------------


@dataclass
class Rig:
    """The module's upstream and the proxies in front of it, started on first use."""

    upstream: CorpusUpstream
    factory: ProxyFactory
    proxies: dict[str, RunningProxy] = field(default_factory=dict)

    def proxy(self, name: str) -> RunningProxy:
        if name not in self.proxies:
            overrides: dict[str, object] = {}
            if name == "slow":
                overrides = {
                    "listeners": {n: {"limits": dict(SLOW_LIMITS)} for n in LISTENERS},
                }
            self.proxies[name] = self.factory(overrides=overrides)
        proxy = self.proxies[name]
        assert proxy.alive(), proxy.output()
        return proxy


@pytest.fixture(scope="module")
def _rig(tmp_path_factory: pytest.TempPathFactory, http_parser: str) -> Iterator[Rig]:
    upstream = CorpusUpstream()
    upstream.start()
    factory = ProxyFactory(tmp_path_factory.mktemp("adversarial"), [upstream.address], http_parser)
    try:
        yield Rig(upstream, factory)
    finally:
        factory.stop_all()
        upstream.stop()
    assert not upstream.errors, f"the recording upstream raised: {upstream.errors!r}"


@pytest.fixture
def corpus_factory(_rig: Rig) -> ProxyFactory:
    """The module's proxy factory (named in a test's arguments, its logs join a failure)."""
    return _rig.factory


# -- driving one case ----------------------------------------------------------------------------


@dataclass
class Exchange:
    """What the client saw."""

    responses: list[Response | None] = field(default_factory=list)
    #: the proxy closed the connection after the expected responses
    closed: bool = False
    #: the connection failed while sending (the proxy had closed it already)
    send_error: str = ""
    #: methods of the requests sent, in order (a HEAD answer has no body to check)
    methods: list[bytes] = field(default_factory=list)


def _methods(case: Case) -> list[bytes]:
    """Methods of the requests the case sends, to read HEAD responses right."""
    sent = b"".join(step.send + step.drip for step in case.steps)
    return [r.method for r in read_requests(sent, READINGS[3])]


def _send(conn: HttpConnection, data: bytes, exchange: Exchange) -> None:
    if exchange.send_error or not data:
        return
    try:
        conn.send(data)
    except OSError as exc:
        exchange.send_error = repr(exc)


def _read(conn: HttpConnection, method: bytes) -> Response | None:
    try:
        return conn.read_response(method=method)
    except (ConnectionClosedError, OSError, ValueError):
        return None


def _await_eof(conn: HttpConnection, timeout: float) -> bool:
    """Read and drop whatever comes until the proxy closes; False if it stays open."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        conn.sock.settimeout(left)
        try:
            if not conn.sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


def drive(port: int, case: Case) -> Exchange:
    methods = _methods(case)
    exchange = Exchange(methods=methods)
    wanted = [o for o in case.expect if o.is_response]

    def read_next(conn: HttpConnection) -> None:
        index = len(exchange.responses)
        previous = exchange.responses[-1] if exchange.responses else None
        if (previous is None and index > 0) or (previous is not None and previous.status == 101):
            exchange.responses.append(None)  # closed, or no longer HTTP
            return
        method = methods[index] if index < len(methods) else b"GET"
        exchange.responses.append(_read(conn, method))

    with HttpConnection(port, timeout=CLIENT_TIMEOUT_S) as conn:
        for step in case.steps:
            _send(conn, step.send, exchange)
            for byte in step.drip:
                _send(conn, bytes((byte,)), exchange)
                time.sleep(step.pause_s)
            if step.sleep_s:
                time.sleep(step.sleep_s)
            for _ in range(step.read):
                read_next(conn)
        while len(exchange.responses) < len(wanted):
            read_next(conn)
        if case.expect[-1].closes and _as_expected(case, exchange):
            exchange.closed = _await_eof(conn, CLIENT_TIMEOUT_S)
    return exchange


def _as_expected(case: Case, exchange: Exchange) -> bool:
    """Whether the responses have the expected statuses (else the case failed already, and
    waiting for the connection to close would only slow the failure down)."""
    wanted = [o for o in case.expect if o.is_response]
    return all(
        response is not None and response.status == outcome.status
        for outcome, response in zip(wanted, exchange.responses, strict=True)
    )


def settle(upstream: CorpusUpstream) -> None:
    """Wait until the upstream has received everything the proxy sent for this case."""

    def snapshot() -> tuple[int, int, int]:
        connections = upstream.connections()
        raw = sum(len(c.raw) for c in connections)
        return len(upstream.requests(include_health=True)), len(connections), raw

    deadline = time.monotonic() + SETTLE_LIMIT_S
    last = snapshot()
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.005)
        now = snapshot()
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= QUIET_S:
            return


# -- checks --------------------------------------------------------------------------------------


def _error_code(response: Response) -> str | None:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        code = response.json()["error"]
        return code if isinstance(code, str) else None
    return None


def check_responses(case: Case, exchange: Exchange) -> list[str]:
    problems: list[str] = []
    wanted = [o for o in case.expect if o.is_response]
    for index, (outcome, response) in enumerate(zip(wanted, exchange.responses, strict=True)):
        label = f"response {index} ({outcome.text!r})"
        if response is None:
            problems.append(f"{label}: no response, the connection closed")
            continue
        seen = f"{response.status} {response.body[:200]!r}"
        if response.status != outcome.status:
            problems.append(f"{label}: got {seen}")
            continue
        head = index < len(exchange.methods) and exchange.methods[index] == b"HEAD"
        if outcome.codes and not head and _error_code(response) not in outcome.codes:
            problems.append(f"{label}: error code not in {sorted(outcome.codes)}: {seen}")
    if case.expect[-1].closes and not exchange.closed:
        problems.append("the proxy did not close the connection")
    return problems


def _connection_problems(
    case: Case, conn: RecordedConnection, parsed: list[RecordedRequest], switched: bool
) -> list[str]:
    raw = bytes(conn.raw)
    where = f"upstream connection {conn.conn_id}"
    prefixes = ALLOWED_PREFIXES[case.listener]
    problems: list[str] = []
    tunnel = b""
    if switched:
        # the last request the upstream parsed here switched protocols; frames follow it
        strict = read_requests(raw, STRICT)
        cut = strict[len(parsed) - 1].end if 0 < len(parsed) <= len(strict) else len(raw)
        raw, tunnel = raw[:cut], raw[cut:]
    strict_found = read_requests(raw, STRICT)
    if [r.target for r in strict_found] != [r.target for r in parsed]:
        problems.append(f"{where}: the strict reading disagrees with the upstream's parser")
    if (strict_found and strict_found[-1].end < len(raw)) or (not strict_found and raw):
        rest = raw[strict_found[-1].end if strict_found else 0 :]
        problems.append(f"{where}: bytes outside any request reached the upstream: {rest[:300]!r}")
    for reading in READINGS:
        found = read_requests(raw, reading)
        if len(found) != len(parsed):
            targets = [r.target for r in found]
            problems.append(
                f"{where}: reading {reading.name} finds {len(found)} requests {targets!r}, "
                f"the upstream parsed {len(parsed)}"
            )
        for request in found:
            label = f"{where}: reading {reading.name}, request {request.target[:200]!r}"
            escapes = escaping_paths(request.target, prefixes)
            if escapes:
                problems.append(f"{label}: read as {escapes[:4]} outside {case.listener}")
            for name, value in request.headers:
                folded = fold_name(name)
                if folded in PROVENANCE_READ:
                    problems.append(f"{label}: provenance header {name!r} reached the upstream")
                if folded in METHOD_OVERRIDE_HEADERS and value.strip().upper() in REFUSED_METHODS:
                    problems.append(
                        f"{label}: {name.decode('latin-1')}: {value[:40]!r} turns the request "
                        f"into a method fastproxy refuses"
                    )
                if folded in URL_OVERRIDE_HEADERS:
                    escapes = escaping_paths(value, prefixes)
                    if escapes:
                        problems.append(
                            f"{label}: {name.decode('latin-1')}: {value[:200]!r} routes to "
                            f"{escapes[:4]} outside {case.listener}"
                        )
            problems.extend(f"{label}: {fault}" for fault in head_line_faults(raw, request))
    if tunnel:
        if not any(o.kind == "tunnel" for o in case.expect):
            problems.append(
                f"{where}: {len(tunnel)} bytes reached the upstream after a switch the client "
                f"never saw: {tunnel[:300]!r}"
            )
        else:
            try:
                websocket_frames(tunnel, masked=True)
            except WebSocketFault as fault:
                problems.append(f"{where}: tunnel bytes are not client frames ({fault})")
    return problems


def check_upstream(case: Case, upstream: CorpusUpstream) -> list[str]:
    problems: list[str] = []
    parsed = upstream.requests()
    targets = [r.target for r in parsed]
    if targets != case.upstream_targets:
        problems.append(f"(a) the upstream parsed {targets!r}, expected {case.upstream_targets!r}")
    health = {
        r.conn_id for r in upstream.requests(include_health=True) if r.target == HEALTH_TARGET
    }
    for conn in upstream.connections():
        if not conn.raw or conn.conn_id in health:
            continue
        here = [r for r in parsed if r.conn_id == conn.conn_id]
        switched = conn.conn_id in upstream.switched
        problems.extend(_connection_problems(case, conn, here, switched))
    return list(dict.fromkeys(problems))


# -- the tests ----------------------------------------------------------------------------------


def _param(case: Case) -> object:
    marks = []
    if case.hole is not None:
        marks.append(pytest.mark.xfail(strict=True, reason=f"hole: {case.hole}"))
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_case(_rig: Rig, corpus_factory: ProxyFactory, case: Case) -> None:
    proxy = _rig.proxy(case.proxy)
    upstream = _rig.upstream
    upstream.reset()
    exchange = drive(proxy.port(case.listener), case)
    settle(upstream)
    problems = check_responses(case, exchange) + check_upstream(case, upstream)
    if exchange.send_error and problems:
        problems.append(f"(sending failed: {exchange.send_error})")
    assert not problems, case.describe() + "\n" + "\n".join(problems)


def test_corpus_covers_every_category() -> None:
    names = {(c.category, c.name) for c in CASES}
    assert len(names) >= 150, len(names)
    assert {c.category for c in CASES} >= CATEGORIES
    files = {p.stem for p in Path(__file__).parent.joinpath("cases").glob("*.toml")}
    assert files == CATEGORIES, files ^ CATEGORIES


def test_every_case_runs_on_both_listeners_unless_it_says_otherwise() -> None:
    per_name: dict[tuple[str, str], set[str]] = {}
    for case in CASES:
        per_name.setdefault((case.category, case.name), set()).add(case.listener)
    both = sum(1 for listeners in per_name.values() if listeners == set(LISTENERS))
    assert both >= len(per_name) * 0.9, (both, len(per_name))


def test_settle_sees_a_quiet_upstream(_rig: Rig) -> None:
    started = time.monotonic()
    settle(_rig.upstream)
    assert time.monotonic() - started < SETTLE_LIMIT_S


# -- the runner's own checks, on bytes made up to leak -------------------------------------------


def _case(listener: str, *outcomes: str, text: str = "") -> Case:
    steps = (Step(send=text.encode()),)
    expect = tuple(parse_outcome(o) for o in outcomes)
    return Case("unit", "made-up", "", listener, "preset", steps, expect, None)


def _problems(case: Case, raw: bytes, *, switched: bool = False) -> list[str]:
    """Run the per-connection checks on ``raw`` as if h11 had parsed it as the upstream does."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    parsed: list[RecordedRequest] = []
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            break  # the upstream stops reading there, as the recording upstream does
        if isinstance(event, h11.Request):
            headers = list(event.headers.raw_items())
            parsed.append(RecordedRequest(0, event.method, event.target, b"1.1", headers))
        elif isinstance(event, h11.EndOfMessage) and conn.their_state is h11.DONE:
            conn.send(h11.Response(status_code=200, headers=[(b"Content-Length", b"0")]))
            conn.send(h11.EndOfMessage())
            conn.start_next_cycle()
        elif event is h11.NEED_DATA or event is h11.PAUSED:
            break
    return _connection_problems(case, RecordedConnection(0, bytearray(raw)), parsed, switched)


CLEAN_FORWARD = b"GET /api/1/devices HTTP/1.1\r\nHost: a\r\nX-Request-Id: 1\r\n\r\n"


def test_checks_pass_a_clean_forward() -> None:
    assert _problems(_case("sdk", "forward /api/1/devices"), CLEAN_FORWARD) == []


def test_checks_catch_a_cl_te_desync() -> None:
    smuggled = b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n"
    raw = (
        b"POST /api/1/devices HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n"
        b"Transfer_Encoding: chunked\r\n\r\n0\r\n\r\n%s" % (5 + len(smuggled), smuggled)
    )
    problems = _problems(_case("sdk", "forward /api/1/devices"), raw)
    assert any("fuzzy-transfer-encoding finds 2 requests" in p for p in problems), problems
    assert any("'/admin'" in p for p in problems), problems


def test_checks_catch_a_path_a_backend_reads_elsewhere() -> None:
    raw = CLEAN_FORWARD.replace(b"/api/1/devices", b"/api/1/devices/%252e%252e/%252e%252e/x")
    problems = _problems(_case("sdk", "forward /api/1/devices"), raw)
    assert any("outside sdk" in p for p in problems), problems


def test_checks_catch_override_headers() -> None:
    raw = CLEAN_FORWARD.replace(b"X-Request-Id: 1", b"X_HTTP_Method_Override: TRACE")
    assert any("provenance header" in p for p in _problems(_case("sdk", "deny"), raw))
    prefix = CLEAN_FORWARD.replace(b"X-Request-Id: 1", b"X-Forwarded-Prefix: /admin")
    problems = _problems(_case("agent", "forward /api/1/devices"), prefix)
    assert any("provenance header" in p for p in problems), problems
    assert any("refuses" in p for p in _problems(_case("agent", "deny"), raw))
    url = CLEAN_FORWARD.replace(b"X-Request-Id: 1", b"X-Rewrite-URL: /admin")
    assert any("routes to" in p for p in _problems(_case("agent", "deny"), url))


def test_checks_catch_bare_line_ends_and_nul() -> None:
    raw = CLEAN_FORWARD.replace(b"X-Request-Id: 1", b"X-A: a\nGET /admin HTTP/1.1")
    problems = _problems(_case("sdk", "forward /api/1/devices"), raw)
    assert any("bare LF" in p for p in problems), problems


def test_checks_catch_bytes_after_a_refused_switch() -> None:
    switch = CLEAN_FORWARD + b"GET /admin HTTP/1.1\r\n\r\n"
    case = _case("sdk", "reject 502 upstream_failed after /api/1/devices")
    problems = _problems(case, switch, switched=True)
    assert any("after a switch the client never saw" in p for p in problems), problems
    tunnel = _case("sdk", "tunnel /api/1/devices")
    assert any("not client frames" in p for p in _problems(tunnel, switch, switched=True))
    frame = CLEAN_FORWARD + b"\x81\x82\x00\x00\x00\x00hi"
    assert _problems(tunnel, frame, switched=True) == []


def test_checks_catch_unparsed_bytes() -> None:
    problems = _problems(_case("sdk", "forward /api/1/devices"), CLEAN_FORWARD + b"GARBAGE")
    assert any("outside any request" in p for p in problems), problems


# -- the case files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "status", "target"),
    [
        ("forward /a?b", "forward", 200, b"/a?b"),
        ("rewrite /index.html?q", "rewrite", 200, b"/index.html?q"),
        ("deny", "deny", 403, None),
        ("reject 400 a|b", "reject", 400, None),
        ("reject 502 upstream_failed after /x", "reject", 502, b"/x"),
        ("relay 426 /s", "relay", 426, b"/s"),
        ("tunnel /s", "tunnel", 101, b"/s"),
        ("local 204", "local", 204, None),
        ("closed", "closed", 0, None),
    ],
)
def test_outcome_grammar(text: str, kind: str, status: int, target: bytes | None) -> None:
    outcome = parse_outcome(text)
    assert (outcome.kind, outcome.status, outcome.target) == (kind, status, target)


@pytest.mark.parametrize(
    "text", ["", "forward", "forward admin", "rewrite /admin", "reject 400", "reject x y", "bye"]
)
def test_outcome_grammar_refuses(text: str) -> None:
    with pytest.raises(CorpusError):
        parse_outcome(text)


@pytest.mark.parametrize(
    "body",
    [
        'id = "a"\nraw = "x"\nexpect = ["deny"]\ntypo = 1',
        'id = "a"\nexpect = ["deny"]',
        'id = "a"\nraw = "x"',
        'id = "a"\nraw = "x"\nsteps = [{ send = "x" }]\nexpect = ["deny"]',
        'id = "a"\nraw = "\\u0100"\nexpect = ["deny"]',
        'id = "a"\nsteps = [{ send = "x", read = 2 }]\nexpect = ["deny"]',
        'id = "a"\nraw = "x"\nexpect = ["deny"]\nlisteners = ["admin"]',
    ],
)
def test_case_files_are_checked(tmp_path: Path, body: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[[case]]\n" + body + "\n")
    with pytest.raises(CorpusError):
        load_file(path)


def test_case_file_expands_repeats_and_holes(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(
        "[[case]]\n"
        'id = "a"\n'
        'raw = "GET /@X@ HTTP/1.1\\r\\n\\r\\n"\n'
        'repeat = { "@X@" = ["ab", 3] }\n'
        'expect = ["forward /@X@"]\n'
        'agent = ["deny"]\n'
        'hole = { agent = "why" }\n'
    )
    sdk, agent = load_file(path)
    assert sdk.steps[0].send == b"GET /ababab HTTP/1.1\r\n\r\n"
    assert sdk.upstream_targets == [b"/ababab"]
    assert (sdk.hole, agent.hole) == (None, "why")
    assert agent.expect[0].kind == "deny"
