"""The command line: ``fastproxy run | check | explain | test | dump-config | demo | version``.

The only module that chooses exit codes: 0 ok, 1 failure (``check`` finding an error, an unknown
listener, a socket that cannot be bound), 2 usage, 3 a worker failed to boot (from the master),
78 a bad configuration for ``run`` (``EX_CONFIG``: systemd's ``RestartPreventExitStatus=78``
keeps a broken file from restarting in a loop).

Imports ``errors``, ``config``, ``policy`` (``explain`` classifies with the listener's table),
``policytest`` (``test``), ``log`` and ``master``; ``demo`` only inside ``fastproxy demo``. It
must not import ``worker``, asyncio or uvloop at import time: ``check``, ``explain`` and ``test``
stay fast and side-effect free.

Invariants: ``argparse.Namespace`` is read in ``main`` only, each command takes typed arguments;
``main`` returns the exit code and never calls ``sys.exit`` (``__main__`` and the console script
do); a configuration error is printed as its message alone, which already names file and key.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import logging
import os
import platform
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from importlib import metadata

from fastproxy import BUILD, __version__, config, log, policytest, tls
from fastproxy.config import Address, Config, ListenerConfig
from fastproxy.errors import EXIT_CONFIG, EXIT_OK, EXIT_USAGE, ConfigError
from fastproxy.exchange import Admission, Verdict, admit
from fastproxy.http1 import RequestHead
from fastproxy.master import BindError, Master, bind_listener
from fastproxy.policy import Action, Decision, Refusal
from fastproxy.policytest import parse_request
from fastproxy.runtime import Snapshot
from fastproxy.systemd import SystemdError

logger = logging.getLogger(__name__)

#: a failure that is not a usage or configuration error (``check`` found an error, bind failed)
EXIT_FAILURE = 1

#: workers ``fastproxy demo`` runs: two, so that the pool is visible in the log
DEMO_WORKERS = 2
#: seconds the demo upstream gets to exit after SIGTERM before SIGKILL
DEMO_STOP_TIMEOUT_S = 5.0

#: dependencies ``fastproxy version`` reports, by distribution name
_REPORTED_DISTRIBUTIONS = ("h11", "wsproto", "uvloop", "orjson", "prometheus-client")

#: ``explain``'s words for each refusal (SPEC 4: why some backend could read another path)
REFUSAL_REASONS: Mapping[Refusal, str] = {
    Refusal.ENCODED_SLASH: "an encoded slash (%2F): backends disagree on whether it splits",
    Refusal.ENCODED_BACKSLASH: "an encoded backslash (%5C): some backends read it as a slash",
    Refusal.ENCODED_CONTROL: "an encoded control character (%00-%1F, %7F)",
    Refusal.RAW_BACKSLASH: "a raw backslash: some backends read it as a slash",
    Refusal.RAW_CONTROL: "a raw control character, space or DEL",
    Refusal.NON_ASCII: "a raw non-ASCII byte",
    Refusal.ENCODED_NON_ASCII: (
        "a percent-encoded non-ASCII byte: Unicode normalisation can turn it into a dot or slash"
    ),
    Refusal.MALFORMED_ESCAPE: "a % not followed by two hex digits",
    Refusal.DOUBLE_ENCODING: "double encoding (%25 and two hex digits): a second decode differs",
    Refusal.SEMICOLON: "a ; in a path segment (..; is a dot segment to Tomcat)",
    Refusal.DOT_WHITESPACE: "a segment that becomes a dot segment once whitespace is trimmed",
    Refusal.UNSAFE_CHARACTER: "a character outside the RFC 3986 path characters",
    Refusal.ABOVE_ROOT: "dot segments that climb above /",
    Refusal.FRAGMENT: "a fragment (#), which clients never send",
    Refusal.ASTERISK_FORM: "the asterisk form (*), which is never forwarded",
    Refusal.BAD_TARGET: "neither an origin-form path nor an http(s) absolute URI",
}


def _error(message: str) -> None:
    print(message, file=sys.stderr)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535 - 3:
        raise argparse.ArgumentTypeError(f"must leave room for 4 ports below 65536, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the whole command line."""
    parser = argparse.ArgumentParser(
        prog="fastproxy",
        description="L7 firewall and reverse proxy for self-hosted co-browsing platforms.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add_config_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            help="configuration file (default: the built-in Cobrowse preset on loopback)",
        )

    def add_log_level_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--log-level",
            default="info",
            choices=list(log.LEVELS),
            type=str.lower,
            help="application log level (default: info)",
        )

    run = commands.add_parser("run", help="run the proxy: a master and its workers")
    add_config_option(run)
    run.add_argument(
        "--workers", type=_positive_int, metavar="N", help="worker processes (overrides the file)"
    )
    run.add_argument(
        "--access-log",
        metavar="PATH",
        help='one JSON object per request: "-" for stdout, or a file to append to (default: off)',
    )
    add_log_level_option(run)

    check = commands.add_parser("check", help="validate a configuration; exit 0 or 1")
    add_config_option(check)
    check.add_argument("-q", "--quiet", action="store_true", help="print nothing when it is ok")

    explain = commands.add_parser(
        "explain", help="show what a listener does with one request, and why"
    )
    add_config_option(explain)
    explain.add_argument("--listener", required=True, metavar="NAME", help="listener name")
    explain.add_argument(
        "request",
        metavar="REQUEST",
        help="'METHOD TARGET' such as 'GET /api/1/devices?x=1'; the method defaults to GET",
    )

    test = commands.add_parser(
        "test", help="run policy cases: what each listener does with each request; exit 0 or 1"
    )
    test.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="configuration file (default: the one the cases file names, else the built-in "
        "Cobrowse preset on loopback)",
    )
    test.add_argument("-q", "--quiet", action="store_true", help="print failures only")
    test.add_argument("cases", metavar="CASES.toml", help="the cases file")

    dump = commands.add_parser("dump-config", help="print the configuration with presets expanded")
    add_config_option(dump)

    demo = commands.add_parser(
        "demo", help="run the Cobrowse preset in front of a built-in demo upstream"
    )
    demo.add_argument(
        "--port-base",
        type=_port,
        metavar="PORT",
        help="use PORT (sdk), PORT+1 (agent), PORT+2 (admin) and PORT+3 (demo upstream) "
        "instead of 8080, 8081, 9901 and 8000",
    )
    add_log_level_option(demo)

    commands.add_parser("version", help="print the versions of fastproxy and its dependencies")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on a usage error and 0 after --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        code = _dispatch(parser, args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader went away (``fastproxy version | head -1``): stop quietly, as a command
        # killed by SIGPIPE would; stdout goes to /dev/null so the exit's flush cannot fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        # Ctrl-C before the master's own handler is in place (start-up): a stop like any other
        # SIGINT, not a traceback; the master's finally has already cleaned up what it started
        return EXIT_OK


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    command: str | None = args.command
    if command == "run":
        return cmd_run(args.config, args.workers, args.log_level, args.access_log)
    if command == "check":
        return cmd_check(args.config, quiet=args.quiet)
    if command == "explain":
        return cmd_explain(args.config, args.listener, args.request)
    if command == "test":
        return cmd_test(args.config, args.cases, quiet=args.quiet)
    if command == "dump-config":
        return cmd_dump_config(args.config)
    if command == "demo":
        return cmd_demo(args.port_base, args.log_level)
    if command == "version":
        return cmd_version()
    parser.print_usage(sys.stderr)
    _error("fastproxy: error: a command is required")
    return EXIT_USAGE


# -- run, check, dump-config ----------------------------------------------------------------------


def _load(path: str | None) -> Config:
    """``config.load_config`` with an unreadable file reported as a ``ConfigError``."""
    try:
        return config.load_config(path)
    except OSError as err:
        raise ConfigError(f"cannot read the file: {err.strerror or err}", where=path or "") from err


def _load_checked(path: str | None) -> Config:
    """``_load``, then every TLS file read and checked as the workers will (``tls.build``)."""
    cfg = _load(path)
    tls.build(cfg)
    return cfg


def cmd_run(
    path: str | None, workers: int | None, log_level: str, access_log: str | None = None
) -> int:
    """``fastproxy run``: load, set up logging, and supervise the workers until stopped."""
    try:
        cfg = _load_checked(path)
    except ConfigError as err:
        _error(str(err))
        return EXIT_CONFIG
    if workers is not None:
        cfg = dataclasses.replace(cfg, workers=workers)
    log.setup(log_level, access_log)  # --access-log wins over the file's [access_log] path
    settings = cfg.access_log
    try:
        log.configure_access(settings.path, sample=settings.sample, query=settings.query.value)
    except OSError as err:
        _error(f"{cfg.source}: access_log.path: cannot open {settings.path!r}: {err.strerror}")
        return EXIT_CONFIG

    def reload() -> Config:
        """SIGHUP: the same file, read again; ``--workers`` still wins over it."""
        cfg = _load(path)
        return cfg if workers is None else dataclasses.replace(cfg, workers=workers)

    return _run_master(cfg, reload)


def _run_master(cfg: Config, loader: Callable[[], Config] | None = None) -> int:
    try:
        return Master(cfg, loader=loader).run()
    except ConfigError as err:
        # a TLS file that changed between the check and the start
        _error(str(err))
        return EXIT_CONFIG
    except (BindError, SystemdError) as err:
        _error(str(err))
        return EXIT_FAILURE
    except Exception:
        # The master has killed and reaped its workers on the way out; say why it stopped.
        logger.exception("the master failed")
        return EXIT_FAILURE


def cmd_check(path: str | None, *, quiet: bool) -> int:
    """``fastproxy check``: 0 and a summary when the configuration is valid, 1 and why if not."""
    try:
        cfg = _load_checked(path)
    except ConfigError as err:
        _error(str(err))
        return EXIT_FAILURE
    if not quiet:
        listeners = _plural(len(cfg.listeners), "listener")
        upstreams = _plural(len(cfg.upstreams), "upstream")
        print(f"{cfg.source}: ok ({listeners}, {upstreams})")
    return EXIT_OK


def cmd_dump_config(path: str | None) -> int:
    """``fastproxy dump-config``: the configuration as the proxy sees it, presets expanded."""
    try:
        cfg = _load(path)
    except ConfigError as err:
        _error(str(err))
        return EXIT_FAILURE
    text: str = config.dump_config(cfg)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return EXIT_OK


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# -- explain ----------------------------------------------------------------------------------


def _show(value: bytes) -> str:
    return value.decode("ascii", "backslashreplace")


def cmd_explain(path: str | None, listener_name: str, request: str) -> int:
    """``fastproxy explain``: what ``listener_name`` does with ``request``, and why. Exits 0 even
    for a denied request; 1 for an unknown listener or a bad configuration."""
    try:
        method, target = parse_request(request)
    except ValueError as err:
        _error(f"fastproxy explain: {err}")
        return EXIT_USAGE
    try:
        cfg = _load(path)
    except ConfigError as err:
        _error(str(err))
        return EXIT_FAILURE
    listener = cfg.listeners.get(listener_name)
    if listener is None:
        suggestion = _suggest(listener_name, cfg.listeners)
        _error(f'{cfg.source}: listeners: unknown listener "{listener_name}" ({suggestion})')
        return EXIT_FAILURE
    for name, value in explain(cfg, listener, method, target):
        print(f"{name:<10} {value}")
    return EXIT_OK


def _suggest(name: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    if close:
        return f'did you mean "{close[0]}"?'
    return "known: " + (", ".join(sorted(known)) or "none")


def explain(
    cfg: Config, listener: ListenerConfig, method: bytes, target: bytes
) -> list[tuple[str, str]]:
    """Return the ``(label, text)`` lines of ``fastproxy explain`` for one request.

    The outcome is ``exchange.admit``'s, the function the worker runs for every request, on
    a request with this method and target and a Host that fits them; only the words are
    added here.
    """
    mode = listener.mode.value
    lines = [
        ("listener", f"{listener.name} ({listener.bind}, policy {listener.policy}, {mode} mode)"),
        ("request", f"{_show(method)} {_show(target)}"),
    ]
    snapshot = Snapshot.build(cfg, 1)
    plan = snapshot.listeners[listener.name]
    host = plan.table.decide(target).authority or str(listener.bind).encode()
    admission = admit(
        RequestHead(method, target, b"1.1", [(b"Host", host)]),
        plan,
        trusted=False,
        peer=b"192.0.2.1",
        new_request_id=lambda: b"explain",
        default_hosts=snapshot.default_hosts,
    )
    decision = admission.decision
    matched = ""
    if decision is not None and decision.refusal is None:
        rule = decision.rule
        fallback = rule.prefix == b"" or rule == listener.fallback
        lines.append(("canonical", _show(decision.path)))
        if decision.authority is not None:
            lines.append(
                ("authority", f"{_show(decision.authority)} (from the absolute-form target)")
            )
        lines.append(
            ("rule", "(fallback)" if fallback else f"{rule.name} (prefix {_show(rule.prefix)})")
        )
        if fallback:
            matched = f"no rule of {listener.policy} matches {_show(decision.path)}; the fallback"
        else:
            matched = (
                f"the longest matching prefix is {_show(rule.prefix)}, rule {rule.name}, which"
            )
    elif decision is not None and admission.status != 204:
        lines.append(("canonical", "none: the target is not a clean path"))

    if admission.status:
        return lines + _explain_local(admission, method, matched)
    assert decision is not None
    forwarded = _upstream_text(cfg, listener, decision)
    verdict = admission.verdict
    rule = decision.rule
    if verdict is Verdict.WOULD_DENY:
        lines += [
            ("decision", f"would_deny: report mode forwards it as {_show(decision.target)}"),
            ("upstream", forwarded),
            ("why", f"{matched} denies; in report mode it is forwarded, counted and logged"),
        ]
    elif verdict is Verdict.REWRITE:
        lines += [
            ("decision", f"rewrite -> {_show(decision.target)}"),
            ("upstream", forwarded),
            ("why", f"{matched} rewrites to {_show(rule.rewrite_to or b'')}, query string kept"),
        ]
    elif rule.action is Action.WEBSOCKET:
        lines += [
            ("decision", f"websocket: forwarded as {_show(decision.target)}, upgrade allowed"),
            ("upstream", forwarded),
            ("why", f"{matched} forwards and allows a WebSocket upgrade"),
        ]
    else:
        lines += [
            ("decision", f"forward as {_show(decision.target)}"),
            ("upstream", forwarded),
            ("why", f"{matched} forwards; an Upgrade header would be refused"),
        ]
    return lines


def _explain_local(admission: Admission, method: bytes, matched: str) -> list[tuple[str, str]]:
    """The lines of a request fastproxy answers itself."""
    code = admission.code
    closed = ", the connection is closed" if admission.close else ""
    decision = admission.decision
    if admission.status == 204:
        return [
            ("decision", "204: answered by fastproxy"),
            ("upstream", "none: OPTIONS * is never forwarded"),
            ("why", "OPTIONS * asks about the server itself, so fastproxy answers it"),
        ]
    if code == "https_redirect":
        location = admission.field.partition(b": ")[2]
        return [
            ("decision", f"redirect 308 to {_show(location)}"),
            ("upstream", "none: the client is sent to https"),
            ("why", f"{matched} redirects to https, method and body kept (308)"),
        ]
    if code == "forbidden":
        return [
            ("decision", "deny 403"),
            ("upstream", "none: a denied request never reaches an upstream"),
            ("why", f"{matched} denies"),
        ]
    if decision is not None and decision.refusal is not None:
        reason = REFUSAL_REASONS.get(decision.refusal, decision.refusal.value)
        why = f"the target has {reason}"
    elif code == "bad_method":
        why = "a method is upper-case letters, '_' and '-' only"
    elif code == "method_not_allowed" and matched:
        why = f"{matched} rewrites to a fixed document, which only GET and HEAD may read"
    elif code == "method_not_allowed":
        why = f"{_show(method)} is refused on this listener before the path is looked at"
    elif code == "bad_host":
        why = "the absolute-form target names another host than the Host header"
    else:
        why = f"the request is refused ({code})"
    return [
        ("decision", f"{admission.status} {code}"),
        ("upstream", f"none: answered by fastproxy{closed}"),
        ("why", why),
    ]


def _upstream_text(cfg: Config, listener: ListenerConfig, decision: Decision) -> str:
    name = decision.rule.upstream or listener.upstream
    upstream = cfg.upstreams.get(name)
    if upstream is None:
        return name
    servers = ", ".join(str(server) for server in upstream.servers)
    return f"{name} ({servers})"


# -- test -------------------------------------------------------------------------------------


def cmd_test(path: str | None, cases_path: str, *, quiet: bool) -> int:
    """``fastproxy test``: run every case of ``cases_path`` through the worker's exchange.

    0 when every case passes, 1 when one does not (each failure named, expected against got),
    2 for a cases file or configuration that cannot be used."""
    try:
        cases = policytest.load_cases(cases_path)
        # not _load_checked: a policy gate in CI needs the routes, not the TLS keys
        cfg = _load(path or cases.config)
        results = policytest.run_cases(cfg, cases)
    except ConfigError as err:
        _error(str(err))
        return EXIT_USAGE
    failed = [result for result in results if not result.passed]
    for result in results:
        if result.passed:
            if not quiet:
                print(f"ok    {result.case.name}")
            continue
        case = result.case
        print(f"FAIL  {case.name}  ({cases.path}: case[{case.index}])")
        for key, want, got in result.mismatches:
            print(f"        {key}: expected {want}, got {got}")
    source = cfg.source
    total = len(results)
    if failed:
        print(f"{len(failed)} of {total} cases failed ({cases.path} against {source})")
        return EXIT_FAILURE
    if not quiet:
        print(f"{_plural(total, 'case')} passed ({cases.path} against {source})")
    return EXIT_OK


# -- demo -------------------------------------------------------------------------------------


def demo_config(cfg: Config, port_base: int | None) -> Config:
    """The preset as ``fastproxy demo`` runs it: every upstream is the demo upstream."""
    cfg = dataclasses.replace(cfg, workers=DEMO_WORKERS)
    if port_base is None:
        return cfg
    ports = {"sdk": port_base, "agent": port_base + 1}
    listeners = {
        name: dataclasses.replace(
            listener, bind=Address(listener.bind.host, ports.get(name, listener.bind.port))
        )
        for name, listener in cfg.listeners.items()
    }
    admin = cfg.admin
    if admin is not None:
        admin = dataclasses.replace(admin, bind=Address(admin.bind.host, port_base + 2))
    demo_upstream = Address("127.0.0.1", port_base + 3)
    upstreams = {
        name: dataclasses.replace(upstream, servers=(demo_upstream,))
        for name, upstream in cfg.upstreams.items()
    }
    return dataclasses.replace(cfg, listeners=listeners, admin=admin, upstreams=upstreams)


def demo_guide(cfg: Config, upstream: Address) -> str:
    """The text ``fastproxy demo`` prints before it starts."""
    sdk = cfg.listeners["sdk"].bind
    agent = cfg.listeners["agent"].bind
    tries = [
        (f"curl -i http://{sdk}/api/1/devices", "forwarded"),
        (f"curl -i http://{sdk}/admin", "403 on the sdk listener"),
        (f"curl -i --path-as-is http://{sdk}/api/1/devices/../admin", "403: canonical path"),
        (f"curl -i 'http://{sdk}/api/1/devices%2f..%2fadmin'", "400: encoded slash"),
        (f"curl -i 'http://{agent}/some/page?tab=2'", "SPA route: /index.html?tab=2"),
    ]
    width = max(len(command) for command, _ in tries)
    lines = [
        "fastproxy demo: the Cobrowse preset in front of a built-in demo upstream",
        "",
        f"  sdk listener (public, SDK devices)    http://{sdk}",
        f"  agent listener (internal, agents)     http://{agent}",
        f"  demo upstream (echoes what it got)    http://{upstream}",
        "",
        "Try:",
        *(f"  {command:<{width}}  # {comment}" for command, comment in tries),
        f"  any WebSocket client, e.g. websocat ws://{sdk}/sockets/1/echo",
        "  fastproxy explain --listener sdk 'GET /api/1/devices/../admin'",
        "",
        "Ctrl-C stops it.",
    ]
    return "\n".join(lines) + "\n"


def cmd_demo(port_base: int | None, log_level: str) -> int:
    """``fastproxy demo``: the demo upstream in a child process, the preset in front of it."""
    try:
        cfg = demo_config(_load(None), port_base)
    except ConfigError as err:
        _error(str(err))
        return EXIT_CONFIG
    sdk_upstream = cfg.upstreams[cfg.listeners["sdk"].upstream]
    upstream = sdk_upstream.servers[0]
    try:
        # Fail here, with a clear message, rather than in the child after the proxy started.
        bind_listener("demo upstream", upstream).close()
    except BindError as err:
        _error(str(err))
        return EXIT_FAILURE
    log.setup(log_level)
    print(demo_guide(cfg, upstream), flush=True)
    pid = _fork_demo_upstream(upstream)
    try:
        # the proxy starts once its upstream listens: a first request never meets a refused
        # connect (a 502, and a passive mark that makes the next ones 503 until a check passes)
        _wait_listening(upstream, pid)
        return _run_master(cfg)
    finally:
        _stop_child(pid)


def _fork_demo_upstream(address: Address) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid != 0:
        return pid
    code = EXIT_FAILURE
    try:
        # Ctrl-C reaches the whole process group; the parent stops this child with SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        from fastproxy import demo

        demo.run_upstream(address.host, address.port)
        code = EXIT_OK
    except BaseException:
        logger.exception("the demo upstream failed")
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _wait_listening(address: Address, pid: int) -> None:
    deadline = time.monotonic() + DEMO_STOP_TIMEOUT_S
    while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
        try:
            socket.create_connection((address.host, address.port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.02)


def _stop_child(pid: int) -> None:
    """SIGTERM child ``pid``, wait for it, SIGKILL it after ``DEMO_STOP_TIMEOUT_S``."""
    deadline = time.monotonic() + DEMO_STOP_TIMEOUT_S
    signum: int = signal.SIGTERM
    while True:
        try:
            done, _status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return  # the master's reaping collected it already: the pid is no longer ours
        if done:
            return
        if signum:
            # Not reaped yet, so the pid is still this child and cannot name another process.
            os.kill(pid, signum)
            signum = 0
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.05)


# -- version ----------------------------------------------------------------------------------


def cmd_version() -> int:
    """``fastproxy version``: fastproxy, Python and the dependencies that shape its behaviour."""
    print(f"fastproxy {__version__}")
    print(f"build {BUILD.describe()}")
    print(f"python {platform.python_version()} ({platform.python_implementation()})")
    for name in _REPORTED_DISTRIBUTIONS:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{name} {version}")
    return EXIT_OK
