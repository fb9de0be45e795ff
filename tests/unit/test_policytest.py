"""``fastproxy test`` and ``policytest``: the shipped cases pass, a changed expectation fails
with exit 1 and a report naming it, and a malformed cases file is a clear error (exit 2).

The cases run through ``exchange.admit`` in process: nothing here forks or binds a socket."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastproxy.cli import main
from fastproxy.config import load_config
from fastproxy.policytest import load_cases, run_cases

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SHIPPED = ["cobrowse-cases.toml", "cobrowse-toggles-cases.toml"]

ONE_CASE = """\
[[case]]
name = "devices"
listener = "sdk"
request = "GET /api/1/devices?x=1"
expect = { decision = "forward", rule = "api-devices", target = "/api/1/devices?x=1" }
"""


def write(tmp_path: Path, text: str, name: str = "cases.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", SHIPPED)
def test_policytest_shipped_cases_pass(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    # CI runs this: the shipped cases hold for the preset and every toggle
    assert main(["test", str(DEPLOY / name)]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    assert (
        out.rstrip()
        .splitlines()[-1]
        .endswith(
            f"cases passed ({DEPLOY / name} against "
            + (
                "<built-in>)"
                if name == "cobrowse-cases.toml"
                else f"{DEPLOY / 'cobrowse-toggles.toml'})"
            )
        )
    )


def test_policytest_shipped_cases_cover_every_decision_and_toggle() -> None:
    decisions = set()
    rules = set()
    listeners = set()
    for name in SHIPPED:
        cases = load_cases(str(DEPLOY / name))
        cfg = load_config(cases.config)
        for result in run_cases(cfg, cases):
            assert result.passed, result.case.name
            decisions.add(result.got["decision"])
            rules.add(result.got["rule"])
            listeners.add((name, result.case.listener))
    assert decisions >= {
        "forward",
        "rewrite",
        "websocket",
        "deny",
        "would_deny",
        "reject",
        "local",
        "redirect",
    }
    # one rule of each toggle
    assert rules >= {"sdk-js", "proxy-universal", "api-virtualagents", "acme-challenge"}
    assert ("cobrowse-cases.toml", "sdk") in listeners
    assert ("cobrowse-cases.toml", "agent") in listeners


def test_policytest_changed_expectation_fails_with_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shipped = (DEPLOY / "cobrowse-cases.toml").read_text()
    changed = shipped.replace(
        'request = "GET /admin"\nexpect = { decision = "deny", status = 403',
        'request = "GET /admin"\nexpect = { decision = "forward", status = 403',
    )
    assert changed != shipped
    path = write(tmp_path, changed)
    assert main(["test", "-q", path]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("FAIL  sdk: the admin pages are not public  (")
    assert out[0].endswith(": case[8])")
    assert out[1].split() == ["decision:", "expected", "forward,", "got", "deny"]
    assert out[-1].startswith("1 of 29 cases failed")


def test_policytest_reports_every_mismatched_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        ONE_CASE.replace("forward", "deny").replace('?x=1" }', '?x=2", status = 403 }'),
    )
    assert main(["test", path]) == 1
    out = capsys.readouterr().out
    assert "decision: expected deny, got forward" in out
    assert "status: expected 403, got none (forwarded)" in out
    assert "target: expected /api/1/devices?x=2, got /api/1/devices?x=1" in out


def test_policytest_target_is_what_is_sent_upstream(tmp_path: Path) -> None:
    text = ONE_CASE.replace("GET /api/1/devices?x=1", "GET /api/1/devices/a/./b/../c?x=1")
    cases = load_cases(write(tmp_path, text))
    (result,) = run_cases(load_config(None), cases)
    assert result.got["target"] == "/api/1/devices/a/c?x=1"


def test_policytest_config_option_wins_over_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the toggles' cases against the built-in preset: pin_sdk is off there
    path = str(DEPLOY / "cobrowse-toggles-cases.toml")
    assert main(["test", "-q", path]) == 0
    config = write(
        tmp_path,
        (DEPLOY / "cobrowse-toggles.toml").read_text().replace("pin_sdk = true", "pin_sdk = false"),
        "fastproxy.toml",
    )
    assert main(["test", "-q", "-c", config, path]) == 1
    out = capsys.readouterr().out
    assert "FAIL  pin_sdk: the web SDK served by the deployment" in out
    assert "decision: expected forward, got deny" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "cases.toml: case: no [[case]] table"),
        ("case = 3\n", "cases.toml: case: must be one or more [[case]] tables, got 3"),
        ("[[case]\n", "cases.toml: not valid TOML"),
        ("cases = []\n", 'cases.toml: unknown key, got "cases" (did you mean "case"?)'),
        (
            ONE_CASE.replace('decision = "forward"', 'decision = "fwd"'),
            'cases.toml: case[1].expect.decision: unknown decision, got "fwd" '
            '(did you mean "forward"?)',
        ),
        (
            ONE_CASE.replace("expect = ", "expected = "),
            'cases.toml: case[1]: unknown key, got "expected" (did you mean "expect"?)',
        ),
        (
            ONE_CASE.replace("expect = {", "expect = { stauts = 200,"),
            'cases.toml: case[1].expect: unknown key, got "stauts" (did you mean "status"?)',
        ),
        (
            ONE_CASE.replace("expect = {", "expect = { status = 1000,"),
            "cases.toml: case[1].expect.status: must be an HTTP status from 100 to 599, got 1000",
        ),
        (
            ONE_CASE.replace('listener = "sdk"', 'listener = "sdc"'),
            'cases.toml: case[1].listener: no such listener in <built-in>, got "sdc" '
            '(did you mean "sdk"?)',
        ),
        (
            ONE_CASE.replace('request = "GET /api/1/devices?x=1"', 'request = "GET / x y"'),
            "cases.toml: case[1].request: expected 'METHOD TARGET'",
        ),
        (
            ONE_CASE.replace('listener = "sdk"\n', ""),
            'cases.toml: case[1]: missing key "listener"',
        ),
        (
            ONE_CASE.replace('listener = "sdk"', 'listener = "sdk"\nheaders = { Host = 1 }'),
            "cases.toml: case[1].headers.Host: must be a string of ASCII without line breaks, "
            "got 1",
        ),
        (
            ONE_CASE + ONE_CASE,
            'cases.toml: case[2].name: the same name as case[1], got "devices" (give each case '
            "a name of its own)",
        ),
        (
            'config = "missing.toml"\n' + ONE_CASE,
            "missing.toml: cannot read the file",
        ),
    ],
)
def test_policytest_malformed_cases_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = write(tmp_path, text)
    assert main(["test", path]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert message in err
    assert len(err.splitlines()) == 1


def test_policytest_missing_cases_file_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["test", str(tmp_path / "none.toml")]) == 2
    assert "none.toml: cannot read the file" in capsys.readouterr().err


def test_policytest_bad_configuration_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, "workers = 0\n", "fastproxy.toml")
    assert main(["test", "-c", config, write(tmp_path, ONE_CASE)]) == 2
    assert "fastproxy.toml: workers" in capsys.readouterr().err


def test_policytest_websocket_shorthand_is_a_valid_handshake(tmp_path: Path) -> None:
    text = ONE_CASE.replace("/api/1/devices?x=1", "/sockets/1/s").replace(
        'request = "GET /sockets/1/s"', 'request = "GET /sockets/1/s"\nwebsocket = true'
    )
    (result,) = run_cases(load_config(None), load_cases(write(tmp_path, text)))
    assert result.got["decision"] == "websocket"
    assert result.got["target"] == "/sockets/1/s"


def test_policytest_does_not_need_the_tls_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a CI machine checking routes has the configuration, not the certificates and keys
    tls = '{ cert = "/nonexistent/tls.crt", key = "/nonexistent/tls.key" }'
    text = (DEPLOY / "cobrowse-toggles.toml").read_text()
    text = text.replace("[listeners.agent]\n", f"[listeners.agent]\ntls = {tls}\n")
    config = write(tmp_path, text, "fastproxy.toml")
    assert main(["check", "-c", config]) == 1  # the proxy itself would not start without them
    capsys.readouterr()
    cases = str(DEPLOY / "cobrowse-toggles-cases.toml")
    assert main(["test", "-q", "-c", config, cases]) == 0
    assert capsys.readouterr() == ("", "")


def test_policytest_runs_the_exchange_head_scanner_and_limits(tmp_path: Path) -> None:
    # refusals made before admission (URI and header limits, duplicate Host) hold in cases too
    long_target = "/api/1/devices/" + "a" * 9000
    headers = ", ".join(f'X-{n} = "v"' for n in range(101))
    text = f"""
[[case]]
listener = "sdk"
request = "GET {long_target}"
expect = {{ decision = "reject", status = 414, code = "uri_too_long" }}

[[case]]
listener = "sdk"
request = "GET /api/1/devices"
headers = {{ {headers} }}
expect = {{ decision = "reject", status = 431 }}

[[case]]
listener = "agent"
request = "GET /api/1/x"
headers = {{ Host = "a", host = "b" }}
expect = {{ decision = "reject", status = 400 }}

[[case]]
listener = "sdk"
request = "POST /api/1/devices"
headers = {{ Content-Length = "5" }}
expect = {{ decision = "forward", target = "/api/1/devices" }}
"""
    results = run_cases(load_config(None), load_cases(write(tmp_path, text)))
    assert [result.mismatches for result in results] == [[], [], [], []]
