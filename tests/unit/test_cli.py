"""The command line: parsing, exit codes, ``check``, ``explain``, ``dump-config``, ``version``,
and the logging ``cli`` sets up. Nothing here forks or binds a socket."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

import fastproxy
from fastproxy import __version__, log
from fastproxy.cli import build_parser, demo_config, demo_guide, main
from fastproxy.config import Address, load_config
from fastproxy.policytest import parse_request

GOOD_CONFIG = """\
workers = 2

[upstreams.cobrowse]
servers = ["127.0.0.1:8000"]

[listeners.sdk]
bind = "127.0.0.1:18443"
policy = "cobrowse-sdk"
upstream = "cobrowse"
mode = "report"

[listeners.agent]
bind = "127.0.0.1:18080"
policy = "cobrowse-agent"
upstream = "cobrowse"
"""

BAD_CONFIG = "[listeners.x]\nbind = 1\n"


@pytest.fixture
def good_config(tmp_path: Path) -> str:
    path = tmp_path / "fastproxy.toml"
    path.write_text(GOOD_CONFIG)
    return str(path)


@pytest.fixture
def bad_config(tmp_path: Path) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_CONFIG)
    return str(path)


def explain_lines(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, str]:
    assert main(["explain", *argv]) == 0
    out = capsys.readouterr().out
    fields = {}
    for line in out.splitlines():
        label, _, text = line.partition(" ")
        fields[label] = text.strip()
    return fields


# -- parsing ----------------------------------------------------------------------------------


def test_cli_parses_run_options() -> None:
    args = build_parser().parse_args(
        ["run", "-c", "edge.toml", "--workers", "4", "--log-level", "DEBUG"]
    )
    assert (args.command, args.config, args.workers, args.log_level) == (
        "run",
        "edge.toml",
        4,
        "debug",
    )


def test_cli_run_defaults() -> None:
    args = build_parser().parse_args(["run"])
    assert (args.config, args.workers, args.log_level) == (None, None, "info")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["run", "--workers", "0"],
        ["run", "--workers", "many"],
        ["run", "--log-level", "loud"],
        ["explain", "/api/1/devices"],  # --listener is required
        ["check", "--unknown"],
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err


def test_cli_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "check", "explain", "dump-config", "demo", "version"):
        assert command in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET /api/1/devices?x=1", (b"GET", b"/api/1/devices?x=1")),
        ("/index.html", (b"GET", b"/index.html")),
        ("  POST   /a  ", (b"POST", b"/a")),
        ("GET /a HTTP/1.1", (b"GET", b"/a")),
    ],
)
def test_cli_parse_request(text: str, expected: tuple[bytes, bytes]) -> None:
    assert parse_request(text) == expected


@pytest.mark.parametrize("text", ["", "GET /a /b", "G(T /a"])
def test_cli_parse_request_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_request(text)


# -- check, run, dump-config ------------------------------------------------------------------


def test_cli_check_good_file(good_config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", good_config]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{good_config}: ok (2 listeners, 1 upstream)\n"
    assert captured.err == ""


def test_cli_check_quiet_prints_nothing(
    good_config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "-q", "-c", good_config]) == 0
    assert capsys.readouterr() == ("", "")


def test_cli_check_builtin_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == 0
    assert capsys.readouterr().out.endswith(": ok (2 listeners, 1 upstream)\n")


def test_cli_check_bad_file_exits_1(bad_config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", bad_config]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"{bad_config}: ")


def test_cli_check_missing_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing.toml")
    assert main(["check", "-c", missing]) == 1
    assert missing in capsys.readouterr().err


def test_cli_run_bad_file_exits_78(bad_config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-c", bad_config]) == 78
    assert capsys.readouterr().err.startswith(f"{bad_config}: ")


def test_cli_dump_config(good_config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dump-config", "-c", good_config]) == 0
    out = capsys.readouterr().out
    assert "[listeners.sdk]" in out
    assert "/api/1/devices" in out


def test_cli_dump_config_bad_file_exits_1(
    bad_config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dump-config", "-c", bad_config]) == 1
    assert capsys.readouterr().err


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"fastproxy {__version__}"
    assert lines[1] == f"build {fastproxy.BUILD.describe()}"
    names = [line.split()[0] for line in lines[1:]]
    for name in ("python", "h11", "wsproto", "uvloop"):
        assert name in names


# -- explain on the built-in preset ---------------------------------------------------------


def test_cli_explain_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    fields = explain_lines(capsys, "--listener", "sdk", "GET /api/1/devices/abc?x=1")
    assert fields["canonical"] == "/api/1/devices/abc"
    assert fields["rule"] == "api-devices (prefix /api/1/devices)"
    assert fields["decision"] == "forward as /api/1/devices/abc?x=1"
    assert fields["upstream"] == "cobrowse (127.0.0.1:8000)"
    assert "/api/1/devices" in fields["why"]


def test_cli_explain_denied_after_dot_segments(capsys: pytest.CaptureFixture[str]) -> None:
    fields = explain_lines(capsys, "--listener", "sdk", "GET /api/1/devices/../admin")
    assert fields["request"] == "GET /api/1/devices/../admin"
    assert fields["canonical"] == "/api/1/admin"
    assert fields["rule"] == "(fallback)"
    assert fields["decision"] == "deny 403"
    assert fields["upstream"].startswith("none")
    assert "denies" in fields["why"]


def test_cli_explain_spa_rewrite_keeps_query(capsys: pytest.CaptureFixture[str]) -> None:
    fields = explain_lines(capsys, "--listener", "agent", "/some/page?tab=2")
    assert fields["request"] == "GET /some/page?tab=2"
    assert fields["rule"] == "(fallback)"
    assert fields["decision"] == "rewrite -> /index.html?tab=2"
    assert fields["upstream"] == "cobrowse (127.0.0.1:8000)"


def test_cli_explain_websocket_rule(capsys: pytest.CaptureFixture[str]) -> None:
    fields = explain_lines(capsys, "--listener", "sdk", "GET /sockets/1/abc")
    assert fields["rule"] == "sockets (prefix /sockets/1/)"
    assert fields["decision"].startswith("websocket")


def test_cli_explain_refuses_encoded_slash(capsys: pytest.CaptureFixture[str]) -> None:
    fields = explain_lines(capsys, "--listener", "sdk", "GET /api/1/devices%2f..%2fadmin")
    assert fields["decision"] == "400 encoded_slash"
    assert "%2F" in fields["why"]


def test_cli_explain_refused_method(capsys: pytest.CaptureFixture[str]) -> None:
    fields = explain_lines(capsys, "--listener", "sdk", "TRACE /api/1/devices")
    assert fields["decision"] == "405 method_not_allowed"


def test_cli_explain_report_mode(good_config: str, capsys: pytest.CaptureFixture[str]) -> None:
    fields = explain_lines(capsys, "-c", good_config, "--listener", "sdk", "GET /admin")
    assert fields["decision"] == "would_deny: report mode forwards it as /admin"
    assert fields["upstream"] == "cobrowse (127.0.0.1:8000)"


def test_cli_explain_unknown_listener(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--listener", "skd", "/"]) == 1
    assert 'did you mean "sdk"?' in capsys.readouterr().err


def test_cli_explain_bad_request_is_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--listener", "sdk", "GET /a /b"]) == 2
    assert "METHOD TARGET" in capsys.readouterr().err


# -- demo ---------------------------------------------------------------------------------------


def test_cli_demo_config_port_base() -> None:
    cfg = demo_config(load_config(None), 18080)
    assert cfg.listeners["sdk"].bind == Address("127.0.0.1", 18080)
    assert cfg.listeners["agent"].bind == Address("127.0.0.1", 18081)
    assert cfg.admin is not None
    assert cfg.admin.bind == Address("127.0.0.1", 18082)
    assert {up.servers for up in cfg.upstreams.values()} == {(Address("127.0.0.1", 18083),)}
    guide = demo_guide(cfg, Address("127.0.0.1", 18083))
    assert "http://127.0.0.1:18080/admin" in guide
    assert "http://127.0.0.1:18081/some/page" in guide


def test_cli_demo_config_defaults_keep_preset_ports() -> None:
    preset = load_config(None)
    cfg = demo_config(preset, None)
    assert cfg.listeners == preset.listeners
    assert cfg.upstreams == preset.upstreams


# -- logging set up by the command line -------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    loggers = [logging.getLogger(log.APP_LOGGER)]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        for handler in lg.handlers:
            if handler not in handlers:
                lg.removeHandler(handler)
                handler.close()
        lg.setLevel(level)
        lg.propagate = propagate


@pytest.mark.usefixtures("restore_logging")
def test_log_lines_are_json_with_fixed_keys(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("debug")
    logger = logging.getLogger("fastproxy.test")
    logger.info("hello %s", "world", extra={"listener": "sdk", "status": 403, "other": "x"})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed")
    lines = capsys.readouterr().err.splitlines()
    first, second = (orjson.loads(line) for line in lines)
    assert list(first) == ["ts", "level", "pid", "logger", "msg", "listener", "status"]
    assert first["msg"] == "hello world"
    assert first["level"] == "INFO"
    assert first["logger"] == "fastproxy.test"
    ts = first["ts"]
    assert isinstance(ts, str)
    assert ts.endswith("Z")
    assert len(ts) == len("2024-01-01T00:00:00.000Z")
    assert "RuntimeError: boom" in second["exc"]


@pytest.mark.usefixtures("restore_logging")
def test_log_level_filters(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("warning")
    logger = logging.getLogger("fastproxy.test")
    logger.info("quiet")
    logger.warning("loud")
    lines = capsys.readouterr().err.splitlines()
    assert [orjson.loads(line)["msg"] for line in lines] == ["loud"]


def test_log_unknown_level() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        log.setup("loud")


def test_cli_explain_says_what_the_proxy_answers(capsys: pytest.CaptureFixture[str]) -> None:
    # explain runs the worker's own admission code: OPTIONS * is the 204 the proxy answers
    fields = explain_lines(capsys, "--listener", "sdk", "OPTIONS *")
    assert fields["decision"] == "204: answered by fastproxy"
    fields = explain_lines(capsys, "--listener", "agent", "POST /some/page")
    assert fields["decision"] == "405 method_not_allowed"
    assert "only GET and HEAD" in fields["why"]
    fields = explain_lines(capsys, "--listener", "sdk", "trace /api/1/devices")
    assert fields["decision"] == "400 bad_method"
    fields = explain_lines(capsys, "--listener", "sdk", "GET http://other.example/api/1/devices")
    assert fields["decision"] == "forward as /api/1/devices"  # Host follows the target here
