"""Properties of canonical paths, checked on paths built from the fragments of known bypasses.

The strongest one is "no bypass": whatever ``decide`` forwards under a rule, a lenient backend
(one that decodes again and again, reads backslash as slash, drops ``;`` parameters, trims
whitespace, applies Unicode NFKC, then removes dot segments) still reads as a path under that
rule's prefix.
"""

from __future__ import annotations

import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from fastproxy.policy import (
    FIXED_REFUSALS,
    Action,
    PathRefused,
    PrefixTable,
    Refusal,
    Rule,
    canonicalize,
)

FAST = settings(max_examples=300, deadline=None, database=None)

FRAGMENTS = [
    *("/", "/", "/", ".", "..", ".", "a", "b", "x", "~", "-", "+", ";", "\\", " "),
    *("%2e", "%2E", "%25", "%2f", "%2F", "%5c", "%20", "%09", "%00", "%3f", "%3b", "%2b"),
    *("%41", "%7e", "%c0%ae", "%ef%bc%8e", "%e2%80%a5", "%ef%bc%8f", "%c2%a0", "%e4%b8%ad"),
    *("%u002e", "%uff0e", "%", "%2", "2e", "%25%32%65", "%252e"),
    *("api", "1", "devices", "sessions", "sockets", "legacy", "index.html", "static"),
]
FRAGMENT_BYTES = [fragment.encode() for fragment in FRAGMENTS]

PREFIXES = [b"/", b"/legacy/", b"/api/1/devices", b"/api/1/", b"/sockets/1/", b"/static/"]
paths = st.tuples(
    st.sampled_from(PREFIXES), st.lists(st.sampled_from(FRAGMENT_BYTES), max_size=14)
).map(lambda start_parts: start_parts[0] + b"".join(start_parts[1]))
queries = st.sampled_from([b"", b"?", b"?a=1", b"?a=%2F&b=/../&c", b"??x=;"])

OPTABLE = frozenset(Refusal) - FIXED_REFUSALS
ALLOW_SETS = [frozenset(), frozenset({Refusal.SEMICOLON}), OPTABLE]

F, WS = Action.FORWARD, Action.WEBSOCKET
DENY = Rule("deny", b"", Action.DENY)
SDK = PrefixTable(
    (
        Rule("devices", b"/api/1/devices", F),
        Rule("sessions", b"/api/1/sessions", F),
        Rule("sockets", b"/sockets/1/", WS),
    ),
    DENY,
)
AGENT = PrefixTable(
    (
        Rule("api", b"/api/1/", F),
        Rule("sockets", b"/sockets/1/", WS),
        Rule("index", b"/index.html", F),
        Rule("static", b"/static/", F),
    ),
    Rule("spa", b"", Action.REWRITE, rewrite_to=b"/index.html"),
)
# a rule that lifts every refusal it may: it must still not reach outside its prefix
LENIENT = PrefixTable(
    (
        Rule("legacy", b"/legacy/", F, allow=OPTABLE),
        Rule("devices", b"/api/1/devices", F, allow=frozenset({Refusal.SEMICOLON})),
        Rule("sockets", b"/sockets/1/", WS),
    ),
    DENY,
)
TABLES = [SDK, AGENT, LENIENT]

HEX_UPPER = b"0123456789ABCDEF"
UNRESERVED = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
STRICT_BYTES = UNRESERVED + b"!$&'()*+,=:@/%"


def _canonical_or_none(path: bytes, allow: frozenset[Refusal]) -> bytes | None:
    try:
        return canonicalize(path, allow)
    except PathRefused:
        return None


def _percent_decode(data: bytes) -> bytes:
    """One lenient decoding pass: %XX, IIS %uXXXX, and "+" as a space."""
    out = bytearray()
    at = 0
    while at < len(data):
        byte = data[at]
        hex2 = data[at + 1 : at + 3]
        hex4 = data[at + 2 : at + 6]
        if byte == 0x25 and len(hex2) == 2 and all(c in b"0123456789abcdefABCDEF" for c in hex2):
            out.append(int(hex2, 16))
            at += 3
        elif (
            byte == 0x25
            and data[at + 1 : at + 2] in (b"u", b"U")
            and len(hex4) == 4
            and all(c in b"0123456789abcdefABCDEF" for c in hex4)
        ):
            out += chr(int(hex4, 16)).encode("utf-8", "surrogatepass")
            at += 6
        else:
            out.append(0x20 if byte == 0x2B else byte)
            at += 1
    return bytes(out)


def _lenient_reading(path: bytes) -> str:
    """How the most forgiving backend could read a forwarded path."""
    for _ in range(5):
        path = _percent_decode(path)
    for overlong, ascii_byte in ((b"\xc0\xae", b"."), (b"\xe0\x80\xae", b"."), (b"\xc0\xaf", b"/")):
        path = path.replace(overlong, ascii_byte)
    text = unicodedata.normalize("NFKC", path.decode("utf-8", "replace")).replace("\\", "/")
    for end in ("?", "#", "\x00"):
        text = text.split(end, 1)[0]
    segments: list[str] = []
    for raw in text.split("/")[1:]:
        segment = raw.split(";", 1)[0].strip().strip("".join(map(chr, range(0x20))))
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments)


def _within(reading: str, prefix: bytes) -> bool:
    base = prefix.decode().rstrip("/")
    return not base or reading == base or reading.startswith(base + "/")


@FAST
@given(paths, st.sampled_from(ALLOW_SETS))
def test_canonicalize_is_idempotent(path: bytes, allow: frozenset[Refusal]) -> None:
    canonical = _canonical_or_none(path, allow)
    if canonical is not None:
        assert canonicalize(canonical, allow) == canonical


@FAST
@given(paths, st.sampled_from(ALLOW_SETS))
def test_canonicalize_output_has_no_empty_or_dot_segment(
    path: bytes, allow: frozenset[Refusal]
) -> None:
    canonical = _canonical_or_none(path, allow)
    if canonical is None:
        return
    assert canonical.startswith(b"/")
    assert b"//" not in canonical
    assert b"/./" not in canonical
    assert b"/../" not in canonical
    assert not canonical.endswith((b"/.", b"/.."))
    segments = canonical.split(b"/")
    assert b"." not in segments
    assert b".." not in segments


@FAST
@given(paths)
def test_canonicalize_strict_output_uses_only_clean_bytes(path: bytes) -> None:
    canonical = _canonical_or_none(path, frozenset())
    if canonical is None:
        return
    assert not canonical.translate(None, STRICT_BYTES)
    for escape in canonical.split(b"%")[1:]:
        assert len(escape) >= 2
        assert escape[0] in HEX_UPPER
        assert escape[1] in HEX_UPPER
        code = int(escape[:2], 16)
        assert code not in UNRESERVED
        assert 0x20 <= code < 0x7F
        assert code not in (0x2F, 0x5C)
        if code == 0x25:  # never a double encoding
            following = escape[2:4]
            assert following[:1] not in (b"u", b"U")
            assert len(following) < 2 or following.translate(None, b"0123456789abcdefABCDEF")


@FAST
@given(st.binary(max_size=40), st.sampled_from(ALLOW_SETS))
def test_canonicalize_raises_only_path_refused(path: bytes, allow: frozenset[Refusal]) -> None:
    canonical = _canonical_or_none(path, allow)
    if canonical is not None:
        assert canonicalize(canonical, allow) == canonical


@FAST
@given(paths, queries, st.sampled_from(TABLES))
def test_decide_is_stable_on_its_own_output(path: bytes, query: bytes, table: PrefixTable) -> None:
    decision = table.decide(path + query)
    if decision.refusal is not None:
        assert decision.rule is table.fallback
        assert decision.target == b""
        return
    again = table.decide(decision.path + query)
    assert again.refusal is None
    assert again.rule is decision.rule
    assert again.target == decision.target
    assert decision.target.endswith(query)


@FAST
@given(paths, queries, st.sampled_from(TABLES))
def test_decide_forwards_nothing_a_lenient_backend_reads_outside_the_rule(
    path: bytes, query: bytes, table: PrefixTable
) -> None:
    decision = table.decide(path + query)
    if decision.refusal is not None:
        return
    rule = decision.rule
    if rule.action is Action.REWRITE:
        assert decision.target == (rule.rewrite_to or b"") + query
        return
    if rule.action is Action.DENY:
        return
    assert decision.target == decision.path + query
    reading = _lenient_reading(decision.path)
    assert _within(reading, rule.prefix), (decision.path, reading, rule.name)


@FAST
@given(st.binary(max_size=40), st.sampled_from(TABLES))
def test_decide_never_raises(target: bytes, table: PrefixTable) -> None:
    decision = table.decide(target)
    assert (decision.refusal is None) == bool(decision.target)
