"""Fixtures shared by the test suites.

- ``upstream``: a started ``RecordingUpstream`` (function scope); its teardown fails the test if
  the upstream itself raised.
- ``proxy``: a ``ProxyFactory``; call it to start fastproxy in front of ``upstream``
  (``proxy()``, ``proxy(servers=[...])``, ``proxy(overrides={...})``); every proxy it started is
  stopped at teardown.
- ``preset``: a ``Stack`` (upstream + proxy with the default config) shared by one test module,
  its upstream's records cleared before each test. For tests that only send requests.
- ``http_parser``: every proxy runs once per parser, ``h11`` and ``httptools`` (SPEC 5: both
  implementations pass the same tests).

When a test fails, the output of every proxy it used is added to the report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from support.proxy import ProxyFactory, Stack
from support.upstream import RecordingUpstream


@contextlib.contextmanager
def running_upstream() -> Iterator[RecordingUpstream]:
    upstream = RecordingUpstream()
    upstream.start()
    try:
        yield upstream
    finally:
        upstream.stop()
    assert not upstream.errors, f"the recording upstream raised: {upstream.errors!r}"


@pytest.fixture
def upstream() -> Iterator[RecordingUpstream]:
    with running_upstream() as started:
        yield started


PARSERS = ("h11", "httptools")


@pytest.fixture(scope="module", params=PARSERS)
def http_parser(request: pytest.FixtureRequest) -> str:
    parser: str = request.param
    return parser


@pytest.fixture
def proxy(upstream: RecordingUpstream, tmp_path: Path, http_parser: str) -> Iterator[ProxyFactory]:
    factory = ProxyFactory(tmp_path, [upstream.address], http_parser)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def factory(upstream: RecordingUpstream, tmp_path: Path) -> Iterator[ProxyFactory]:
    """Proxies in front of ``upstream`` on the default parser only: for the tests of what the
    parser plays no part in (reload, drain, systemd)."""
    made = ProxyFactory(tmp_path, [upstream.address])
    try:
        yield made
    finally:
        made.stop_all()


@pytest.fixture(scope="module")
def _preset_stack(tmp_path_factory: pytest.TempPathFactory, http_parser: str) -> Iterator[Stack]:
    with running_upstream() as started:
        factory = ProxyFactory(tmp_path_factory.mktemp("preset"), [started.address], http_parser)
        try:
            yield Stack(started, factory(), factory)
        finally:
            factory.stop_all()


@pytest.fixture
def preset(_preset_stack: Stack) -> Stack:
    assert _preset_stack.proxy.alive(), _preset_stack.proxy.output()
    _preset_stack.upstream.reset()
    return _preset_stack


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and isinstance(item, pytest.Function):
        for value in item.funcargs.values():
            if isinstance(value, ProxyFactory | Stack):
                report.sections.extend(value.log_sections())
    return report
