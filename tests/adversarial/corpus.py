"""Load the adversarial cases: ``cases/<category>.toml``, one ``[[case]]`` table per attack.

A case is data, checked here when loaded (unknown keys are errors)::

    [[case]]
    id = "dotdot-encoded"                       # unique within its file
    about = "%2e%2e is a dot segment"           # optional, one line
    raw = "GET /api/1/devices/%2e%2e/x HTTP/1.1\\r\\nHost: edge.example\\r\\n\\r\\n"
    expect = ["deny"]                           # both listeners ...
    agent = ["rewrite /index.html"]             # ... unless one has its own list
    listeners = ["sdk", "agent"]                # the default
    proxy = "preset"                            # or "slow" (short client timeouts)
    repeat = { "@A@" = ["a", 9000] }            # marker -> text repeated (in raw, steps and
                                                # outcomes), for big requests
    hole = "..."                                # a known hole: the case fails until fixed
    hole = { agent = "..." }                    # ... on one listener only

Strings are bytes: each character is one byte (``\\u0000``-``\\u00ff``), unless the case says
``encoding = "utf-8"``. Instead of ``raw`` a case may give ``steps``, sent in order:
``{ send = "...", read = 1 }`` (write, then read that many responses), ``{ drip = "...",
pause_ms = 20 }`` (one byte per write), ``{ sleep_s = 0.3 }``. Responses not read by a step are
read after the last one.

Each outcome is one string, in the order of the responses:

- ``forward TARGET`` / ``rewrite TARGET``: the upstream received TARGET and the client got 200;
- ``deny [CODE]``: 403 from fastproxy (``forbidden`` by default), nothing upstream;
- ``reject STATUS CODE[|CODE...] [after TARGET]``: fastproxy's own error and the connection
  closed; with ``after`` the upstream had already received (part of) a request for TARGET;
- ``relay STATUS TARGET``: the upstream's own non-101 answer to TARGET, relayed;
- ``tunnel TARGET``: a 101 for TARGET, the WebSocket tunnel open;
- ``local STATUS``: answered by fastproxy without the upstream and without an error code;
- ``closed``: the proxy closes the connection (whatever bytes come first).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CASES_DIR = Path(__file__).parent / "cases"
LISTENERS = ("sdk", "agent")
PROXIES = ("preset", "slow")

Kind = Literal["forward", "rewrite", "deny", "reject", "relay", "tunnel", "local", "closed"]
_KINDS: tuple[Kind, ...] = ("forward", "rewrite", "deny", "reject", "relay", "tunnel", "local")
#: the kinds whose one argument is the target the upstream receives
_TARGET_KINDS: dict[str, Kind] = {"forward": "forward", "rewrite": "rewrite", "tunnel": "tunnel"}

_CASE_KEYS = frozenset(
    {
        "id",
        "about",
        "raw",
        "steps",
        "expect",
        "sdk",
        "agent",
        "listeners",
        "proxy",
        "repeat",
        "hole",
        "encoding",
    }
)
_STEP_KEYS = frozenset({"send", "read", "drip", "pause_ms", "sleep_s"})


class CorpusError(Exception):
    """A case file does not have the documented shape."""


@dataclass(frozen=True, slots=True)
class Step:
    send: bytes = b""
    #: sent one byte per write, ``pause_s`` apart
    drip: bytes = b""
    pause_s: float = 0.0
    sleep_s: float = 0.0
    #: responses to read after this step
    read: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    text: str
    status: int = 0
    #: acceptable error codes of fastproxy's reply (empty: not checked)
    codes: frozenset[str] = frozenset()
    #: the request-target the upstream receives for this request, if any
    target: bytes | None = None

    @property
    def is_response(self) -> bool:
        return self.kind != "closed"

    @property
    def closes(self) -> bool:
        """Whether fastproxy must close the connection after this outcome (SPEC 5: a 400 and
        the other refusals of a request it cannot trust do; a 403 or a 405 need not)."""
        return self.kind == "closed" or (self.kind == "reject" and self.status != 405)


@dataclass(frozen=True, slots=True)
class Case:
    """One case on one listener."""

    category: str
    name: str
    about: str
    listener: str
    proxy: str
    steps: tuple[Step, ...]
    expect: tuple[Outcome, ...]
    hole: str | None

    @property
    def id(self) -> str:
        return f"{self.category}/{self.name}/{self.listener}"

    @property
    def upstream_targets(self) -> list[bytes]:
        """What the upstream may parse, in order: the targets of the outcomes."""
        return [o.target for o in self.expect if o.target is not None]

    def describe(self) -> str:
        sent = b"".join(s.send + s.drip for s in self.steps)
        return f"{self.id}: {self.about}\nsent: {sent[:600]!r}\nexpected: {self.expect!r}"


def parse_outcome(text: str) -> Outcome:
    """Parse one outcome string of the grammar in the module docstring."""
    words = text.split()
    if not words:
        raise CorpusError("empty outcome")
    kind, args = words[0], words[1:]
    if kind == "closed" and not args:
        return Outcome("closed", text)
    target_kind = _TARGET_KINDS.get(kind)
    if target_kind is not None and len(args) == 1 and args[0][:1] == "/":
        status = 101 if target_kind == "tunnel" else 200
        if target_kind == "rewrite" and not args[0].startswith("/index.html"):
            raise CorpusError(f"a rewrite goes to /index.html: {text!r}")
        return Outcome(target_kind, text, status, frozenset(), args[0].encode("latin-1"))
    if kind == "deny" and len(args) <= 1:
        return Outcome("deny", text, 403, frozenset((args or ["forbidden"])[0].split("|")))
    if kind == "local" and len(args) == 1 and args[0].isdigit():
        return Outcome("local", text, int(args[0]))
    if kind == "relay" and len(args) == 2 and args[0].isdigit():
        return Outcome("relay", text, int(args[0]), frozenset(), args[1].encode("latin-1"))
    if kind == "reject" and len(args) in (2, 4) and args[0].isdigit():
        target = None
        if len(args) == 4:
            if args[2] != "after":
                raise CorpusError(f"expected 'after TARGET': {text!r}")
            target = args[3].encode("latin-1")
        return Outcome("reject", text, int(args[0]), frozenset(args[1].split("|")), target)
    raise CorpusError(f"not an outcome: {text!r} (kinds: {', '.join(_KINDS)}, closed)")


def _bytes(value: object, encoding: str, where: str) -> bytes:
    if not isinstance(value, str):
        raise CorpusError(f"{where}: expected a string, got {value!r}")
    try:
        return value.encode(encoding)
    except UnicodeEncodeError as exc:
        raise CorpusError(f"{where}: a character above \\u00ff needs encoding = 'utf-8'") from exc


def _expand(data: bytes, repeat: Mapping[bytes, bytes]) -> bytes:
    for marker, text in repeat.items():
        data = data.replace(marker, text)
    return data


def _repeat(table: Mapping[str, object], encoding: str, where: str) -> dict[bytes, bytes]:
    repeat: dict[bytes, bytes] = {}
    raw_repeat = table.get("repeat", {})
    if not isinstance(raw_repeat, dict):
        raise CorpusError(f"{where}.repeat: expected a table")
    for marker, spec in raw_repeat.items():
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], int)):
            raise CorpusError(f"{where}.repeat.{marker}: expected [text, count]")
        repeat[marker.encode("latin-1")] = _bytes(spec[0], encoding, where) * spec[1]
    return repeat


def _steps(
    table: Mapping[str, object], encoding: str, repeat: Mapping[bytes, bytes], where: str
) -> list[Step]:
    if ("raw" in table) == ("steps" in table):
        raise CorpusError(f"{where}: give exactly one of raw and steps")
    if "raw" in table:
        return [Step(send=_expand(_bytes(table["raw"], encoding, f"{where}.raw"), repeat))]
    raw_steps = table["steps"]
    if not isinstance(raw_steps, list) or not raw_steps:
        raise CorpusError(f"{where}.steps: expected a non-empty array of tables")
    steps: list[Step] = []
    for index, step in enumerate(raw_steps):
        here = f"{where}.steps[{index}]"
        if not isinstance(step, dict) or set(step) - _STEP_KEYS:
            raise CorpusError(f"{here}: expected a table with keys among {sorted(_STEP_KEYS)}")
        read = step.get("read", 0)
        pause_ms = step.get("pause_ms", 0)
        sleep_s = step.get("sleep_s", 0)
        if not isinstance(read, int) or not isinstance(pause_ms, int | float):
            raise CorpusError(f"{here}: read is an integer, pause_ms a number")
        if not isinstance(sleep_s, int | float):
            raise CorpusError(f"{here}: sleep_s is a number")
        send = _expand(_bytes(step.get("send", ""), encoding, here), repeat)
        drip = _expand(_bytes(step.get("drip", ""), encoding, here), repeat)
        steps.append(Step(send, drip, pause_ms / 1000, float(sleep_s), read))
    return steps


def _outcomes(value: object, repeat: Mapping[bytes, bytes], where: str) -> tuple[Outcome, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise CorpusError(f"{where}: expected a non-empty array of outcome strings")
    texts = [_expand(v.encode("latin-1"), repeat).decode("latin-1") for v in value]
    try:
        return tuple(parse_outcome(text) for text in texts)
    except CorpusError as exc:
        raise CorpusError(f"{where}: {exc}") from None


def load_file(path: Path) -> list[Case]:
    """Every case of one file, one per listener it applies to."""
    category = path.stem
    with path.open("rb") as handle:
        document = tomllib.load(handle)
    if set(document) != {"case"} or not isinstance(document["case"], list):
        raise CorpusError(f"{path.name}: expected only [[case]] tables")
    cases: list[Case] = []
    seen: set[str] = set()
    for index, table in enumerate(document["case"]):
        where = f"{path.name}: case[{index}]"
        unknown = set(table) - _CASE_KEYS
        if unknown:
            raise CorpusError(f"{where}: unknown keys {sorted(unknown)}")
        name = table.get("id")
        if not isinstance(name, str) or not name or name in seen:
            raise CorpusError(f"{where}: id missing or repeated: {name!r}")
        seen.add(name)
        where = f"{path.name}: {name}"
        encoding = "utf-8" if table.get("encoding") == "utf-8" else "latin-1"
        repeat = _repeat(table, encoding, where)
        steps = tuple(_steps(table, encoding, repeat, where))
        listeners = table.get("listeners", list(LISTENERS))
        if not isinstance(listeners, list) or not set(listeners) <= set(LISTENERS):
            raise CorpusError(f"{where}.listeners: expected a subset of {LISTENERS}")
        proxy = table.get("proxy", "preset")
        if proxy not in PROXIES:
            raise CorpusError(f"{where}.proxy: expected one of {PROXIES}")
        hole = table.get("hole")
        for listener in listeners:
            spec = table.get(listener, table.get("expect"))
            if spec is None:
                raise CorpusError(f"{where}: no expectation for listener {listener}")
            expect = _outcomes(spec, repeat, f"{where}.{listener}")
            responses = sum(1 for o in expect if o.is_response)
            if sum(s.read for s in steps) > responses:
                raise CorpusError(f"{where}: the steps read more responses than expected")
            listener_hole = hole.get(listener) if isinstance(hole, dict) else hole
            if listener_hole is not None and not isinstance(listener_hole, str):
                raise CorpusError(f"{where}.hole: expected a string or a table of strings")
            cases.append(
                Case(
                    category=category,
                    name=name,
                    about=str(table.get("about", "")),
                    listener=listener,
                    proxy=proxy,
                    steps=steps,
                    expect=expect,
                    hole=listener_hole,
                )
            )
    return cases


def load_all(directory: Path = CASES_DIR) -> list[Case]:
    """Every case of every ``*.toml`` file in ``directory``, file by file in name order."""
    cases: list[Case] = []
    for path in sorted(directory.glob("*.toml")):
        cases.extend(load_file(path))
    return cases
