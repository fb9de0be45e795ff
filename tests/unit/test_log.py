"""The buffered access-log writer: record format, buffering, whole-line writes, reopen, errors,
stdout, fork, and ``setup``/``reopen`` at module level. Real files in ``tmp_path``, read back
with ``os`` calls; no loop, no sockets."""

from __future__ import annotations

import datetime
import errno
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from fastproxy import log

#: the fields and the order ``ClientProtocol._access_log`` writes
FIELDS: dict[str, object] = {
    "request_id": "5f2b9c0d1e3a4b5c6d7e",
    "client_ip": "127.0.0.1",
    "method": "GET",
    "host": "sdk.example.com",
    "path": "/api/1/devices/x",
    "query": "session=REDACTED",
    "listener": "sdk",
    "tls": True,
    "rule": "api-devices",
    "decision": "forward",
    "status": 200,
    "reason": None,
    "duration_s": 0.012345,
    "upstream": "origin",
    "server": "10.0.0.5:8080",
    "upstream_response_s": 0.011,
    "bytes_in": 412,
    "bytes_out": 1187,
    "user_agent": "Mozilla/5.0",
    "generation": 3,
}
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class Opaque:
    """A value orjson cannot encode: written as its str(), as the logging handler did."""

    def __str__(self) -> str:
        return "opaque"


def read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def old_format(ts: str, fields: dict[str, object]) -> bytes:
    """What the ``logging`` handler and ``AccessFormatter`` wrote before the writer."""
    doc: dict[str, object] = {"ts": ts}
    doc.update(fields)
    return orjson.dumps(doc, default=str).decode().encode("utf-8") + b"\n"


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[log.AccessLog]:
    access = log.AccessLog(str(tmp_path / "access.log"))
    yield access
    access.close()


@pytest.fixture
def isolated_setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let a test call ``log.setup``; put the loggers and ``log.access`` back afterwards."""
    monkeypatch.setattr(log, "access", None)  # a writer left by another test is not ours to close
    monkeypatch.setattr(log, "_installed", [])
    monkeypatch.setattr(log, "_forced_path", None)
    loggers = [logging.getLogger(log.APP_LOGGER), logging.getLogger("asyncio")]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    if log.access is not None:
        log.access.close()
    for lg, handlers, level, propagate in saved:
        for handler in lg.handlers:
            if handler not in handlers:
                lg.removeHandler(handler)
                handler.close()
        lg.setLevel(level)
        lg.propagate = propagate


# -- format ---------------------------------------------------------------------------------


def test_access_log_record_format_matches_the_logging_handler(
    writer: log.AccessLog, tmp_path: Path
) -> None:
    fields = {**FIELDS, "path": "/caf\u00e9", "upstream": Opaque()}
    before = time.time()
    writer.write(fields)
    after = time.time()
    writer.flush()
    line = read(tmp_path / "access.log")
    record = orjson.loads(line)
    assert list(record) == ["ts", *fields]
    ts = record["ts"]
    assert isinstance(ts, str)
    assert TS.fullmatch(ts), ts
    assert line == old_format(ts, fields)
    assert record["upstream"] == "opaque"  # default=str, as before
    assert record["reason"] is None
    stamp = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
    assert int(before * 1000) / 1000 <= stamp <= after


def test_access_log_ts_recomputed_when_the_second_changes(
    writer: log.AccessLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter([1_700_000_000_998_000_000, 1_700_000_000_999_999_999, 1_700_000_001_000_000_000])
    monkeypatch.setattr(time, "time_ns", lambda: next(clock))
    for n in range(3):
        writer.write({"n": n})
    writer.flush()
    stamps = [orjson.loads(line)["ts"] for line in read(tmp_path / "access.log").splitlines()]
    assert stamps == [
        "2023-11-14T22:13:20.998Z",
        "2023-11-14T22:13:20.999Z",
        "2023-11-14T22:13:21.000Z",
    ]


def test_access_log_empty_record_and_own_ts(writer: log.AccessLog, tmp_path: Path) -> None:
    writer.write({})
    writer.write({"status": 200, "ts": "given"})
    writer.flush()
    first, second = read(tmp_path / "access.log").splitlines()
    assert list(orjson.loads(first)) == ["ts"]
    # a record's own ts replaces the stamp in first place, as the logging handler did
    assert second == b'{"ts":"given","status":200}'


# -- buffering ------------------------------------------------------------------------------


def test_access_log_nothing_written_before_flush(writer: log.AccessLog, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    for n in range(10):
        writer.write({**FIELDS, "status": n})
    assert read(path) == b""
    writer.flush()
    lines = read(path).splitlines()
    assert [orjson.loads(line)["status"] for line in lines] == list(range(10))
    writer.flush()  # nothing pending: no write, no change
    assert read(path).splitlines() == lines


def test_access_log_flushes_whole_lines_at_the_size_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "access.log"
    writes: list[bytes] = []
    real_write = os.write

    def spy(fd: int, data: bytes | memoryview) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    access = log.AccessLog(str(path), buffer_bytes=1000)
    line_size = len(old_format("2024-01-01T00:00:00.000Z", FIELDS))
    per_flush = -(-1000 // line_size)  # the record that reaches the limit triggers the write
    for n in range(per_flush - 1):
        access.write({**FIELDS, "status": n})
    assert writes == []
    access.write({**FIELDS, "status": per_flush - 1})
    assert len(writes) == 1
    assert read(path) == writes[0]
    assert writes[0].endswith(b"\n")
    assert [orjson.loads(line)["status"] for line in writes[0].splitlines()] == list(
        range(per_flush)
    )
    access.write(FIELDS)
    access.close()
    assert len(writes) == 2  # close flushes
    assert len(read(path).splitlines()) == per_flush + 1


def test_access_log_partial_writes_and_eintr_are_retried(
    writer: log.AccessLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    calls = 0

    def dribble(fd: int, data: bytes | memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise InterruptedError(errno.EINTR, "interrupted")
        if calls == 3:
            raise BlockingIOError(errno.EAGAIN, "try again")
        return real_write(fd, bytes(data)[:100])

    monkeypatch.setattr(os, "write", dribble)
    for n in range(5):
        writer.write({**FIELDS, "status": n})
    writer.flush()
    lines = read(tmp_path / "access.log").splitlines()
    assert [orjson.loads(line)["status"] for line in lines] == list(range(5))
    assert calls > 5


def test_access_log_write_that_makes_no_progress_is_dropped(
    writer: log.AccessLog, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    writer.write(FIELDS)
    with caplog.at_level(logging.ERROR, logger="fastproxy.log"):
        writer.flush()  # returns instead of looping forever
    assert "wrote nothing" in caplog.records[0].getMessage()


# -- reopen ---------------------------------------------------------------------------------


def test_access_log_reopen_after_rename(writer: log.AccessLog, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    writer.write({"path": "/flushed"})
    writer.flush()
    writer.write({"path": "/pending"})
    rotated = tmp_path / "access.log.1"
    path.rename(rotated)
    assert writer.reopen()
    writer.write({"path": "/new"})
    writer.flush()
    old = [orjson.loads(line)["path"] for line in read(rotated).splitlines()]
    assert old == ["/flushed", "/pending"]  # pending records go to the file they were meant for
    assert [orjson.loads(line)["path"] for line in read(path).splitlines()] == ["/new"]
    assert os.stat(path).st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_access_log_reopen_failure_keeps_the_old_file(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "access.log"
    access = log.AccessLog(str(path))
    path.rename(tmp_path / "moved.log")
    directory.rmdir()
    with pytest.raises(FileNotFoundError):
        access.reopen()
    access.write({"path": "/still"})
    access.close()
    assert orjson.loads(read(tmp_path / "moved.log"))["path"] == "/still"


# -- errors ---------------------------------------------------------------------------------


def test_access_log_write_errors_never_raise_and_are_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    access = log.AccessLog("/dev/full")
    with caplog.at_level(logging.ERROR, logger="fastproxy.log"):
        for _ in range(3):
            access.write(FIELDS)
            access.flush()  # ENOSPC
    access.close()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "/dev/full" in errors[0].getMessage()


def test_access_log_write_after_close_is_dropped(
    writer: log.AccessLog, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer.write({"path": "/before"})
    writer.close()
    with caplog.at_level(logging.ERROR, logger="fastproxy.log"):
        writer.write({"path": "/after"})
        writer.flush()  # EBADF, reported, not raised
        writer.close()
    assert [orjson.loads(line)["path"] for line in read(tmp_path / "access.log").splitlines()] == [
        "/before"
    ]
    assert len(caplog.records) == 1


def test_access_log_recovery_reports_the_dropped_count(
    writer: log.AccessLog,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_write = os.write

    def full(fd: int, data: bytes | memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    caplog.set_level(logging.INFO, logger="fastproxy.log")
    monkeypatch.setattr(os, "write", full)
    for _ in range(3):
        writer.write(FIELDS)
    writer.flush()
    writer.write(FIELDS)
    writer.flush()
    monkeypatch.setattr(os, "write", real_write)
    writer.write({"path": "/back"})
    writer.flush()
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.WARNING]
    assert "dropping 4 records" in caplog.records[1].getMessage()
    assert orjson.loads(read(tmp_path / "access.log"))["path"] == "/back"


# -- stdout and fork ------------------------------------------------------------------------


def test_access_log_dash_writes_to_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    access = log.AccessLog("-")
    access.write(FIELDS)
    assert capfd.readouterr().out == ""
    access.flush()
    out = capfd.readouterr().out
    assert list(orjson.loads(out)) == ["ts", *FIELDS]
    assert not access.reopen()  # nothing to reopen
    access.close()
    os.fstat(1)  # stdout stays open


def test_access_log_child_never_writes_the_parents_pending_lines(
    writer: log.AccessLog, tmp_path: Path
) -> None:
    writer.write({"path": "/parent"})
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            writer.write({"path": "/child"})
            writer.flush()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    writer.flush()
    paths = [orjson.loads(line)["path"] for line in read(tmp_path / "access.log").splitlines()]
    assert paths == ["/child", "/parent"]


# -- setup and reopen at module level ----------------------------------------------------------


@pytest.mark.usefixtures("isolated_setup")
def test_setup_without_access_log_has_no_writer(capfd: pytest.CaptureFixture[str]) -> None:
    log.setup("debug", access_log=None)
    assert log.access is None
    assert log.reopen() == 0
    assert capfd.readouterr() == ("", "")


@pytest.mark.usefixtures("isolated_setup")
def test_setup_replaces_and_closes_the_previous_writer(tmp_path: Path) -> None:
    first_path, second_path = tmp_path / "first.log", tmp_path / "second.log"
    log.setup("info", access_log=str(first_path))
    first = log.access
    assert first is not None
    first.write({"path": "/first"})
    log.setup("info", access_log=str(second_path))
    assert log.access is not None
    assert log.access is not first
    assert orjson.loads(read(first_path))["path"] == "/first"  # flushed at close
    log.access.write({"path": "/second"})
    log.setup("info")
    assert log.access is None
    assert orjson.loads(read(second_path))["path"] == "/second"


@pytest.mark.usefixtures("isolated_setup")
def test_setup_module_reopen_counts_the_access_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "access.log"
    log.setup("info", access_log=str(path))
    assert log.access is not None
    log.access.write({"path": "/a"})
    path.rename(tmp_path / "access.log.1")
    assert log.reopen() == 1
    log.access.write({"path": "/b"})
    log.access.flush()
    assert orjson.loads(read(tmp_path / "access.log.1"))["path"] == "/a"
    assert orjson.loads(read(path))["path"] == "/b"
    # The directory is gone: the failed reopen is reported, never raised into the master.
    path.rename(tmp_path / "moved.log")
    directory.rmdir()
    assert log.reopen() == 0
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "cannot reopen" in caplog.records[0].getMessage()
    log.access.write({"path": "/c"})
    log.access.flush()
    assert [orjson.loads(line)["path"] for line in read(tmp_path / "moved.log").splitlines()] == [
        "/b",
        "/c",
    ]


@pytest.mark.usefixtures("isolated_setup")
def test_setup_stdout_is_not_counted_by_reopen(capfd: pytest.CaptureFixture[str]) -> None:
    log.setup("info", access_log="-")
    assert log.access is not None
    log.access.write({"path": "/a"})
    assert log.reopen() == 0
    assert orjson.loads(capfd.readouterr().out)["path"] == "/a"  # reopen flushed it


def test_throttle_one_line_per_key_per_interval_with_the_count_left_out() -> None:
    throttle = log.Throttle(10.0)
    assert throttle.check("a", 100.0) == 0
    assert throttle.check("a", 101.0) is None
    assert throttle.check("a", 105.0) is None
    assert throttle.check("b", 105.0) == 0  # keys are independent
    assert throttle.check("a", 110.5) == 2  # the two left out, on the next line written
    assert throttle.check("a", 111.0) is None
    assert throttle.check("a", 121.0) == 1


@pytest.mark.usefixtures("isolated_setup")
def test_setup_sends_asyncio_records_as_json_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # only the handler this setup installs (another test's may write to a closed stream)
    monkeypatch.setattr(logging.getLogger("asyncio"), "handlers", [])
    log.setup("info")
    logging.getLogger("asyncio").error("Fatal error on transport", exc_info=ValueError("x"))
    lines = capsys.readouterr().err.splitlines()
    record = orjson.loads(lines[-1])
    assert record["logger"] == "asyncio" and record["level"] == "ERROR"
    assert "ValueError: x" in record["exc"]
    assert len(lines) == 1, lines  # one JSON line, no plain-text traceback after it


# -- [access_log] settings, sampling, query redaction --------------------------------------------


@pytest.mark.parametrize(
    ("query", "redacted"),
    [
        (b"a=1&b=2", b"a=REDACTED&b=REDACTED"),
        (b"token=s3cr3t", b"token=REDACTED"),
        (b"flag&x=", b"flag&x=REDACTED"),
        (b"a=1=2&&b", b"a=REDACTED&&b"),
        (b"", b""),
    ],
)
def test_redact_query_keeps_the_keys_and_hides_every_value(query: bytes, redacted: bytes) -> None:
    assert log.redact_query(query) == redacted


@pytest.mark.parametrize(("sample", "kept"), [(1.0, 100), (0.25, 25), (0.5, 50), (0.0, 0)])
def test_sampled_keeps_exactly_the_share_evenly(
    writer: log.AccessLog, sample: float, kept: int
) -> None:
    writer.sample = sample
    calls = [writer.sampled() for _ in range(100)]
    assert sum(calls) == kept
    if sample == 0.25:
        assert calls[:8] == [False, False, False, True] * 2  # spread, not bunched


@pytest.mark.usefixtures("isolated_setup")
def test_configure_access_opens_keeps_switches_and_turns_off(tmp_path: Path) -> None:
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    log.setup("info")
    log.configure_access(str(first), sample=0.5, query="drop")
    writer = log.access
    assert writer is not None
    assert (writer.path, writer.sample, writer.query) == (str(first), 0.5, "drop")
    writer.write({"path": "/a"})
    log.configure_access(str(first), sample=1.0, query="keep")
    assert log.access is writer  # same path: the same writer, its buffer kept
    assert (writer.sample, writer.query) == (1.0, "keep")
    log.configure_access(str(second))
    assert log.access is not writer
    assert orjson.loads(read(first))["path"] == "/a"  # the old writer flushed at close
    log.configure_access(None)
    assert log.access is None


@pytest.mark.usefixtures("isolated_setup")
def test_configure_access_the_flag_path_wins_over_the_file(tmp_path: Path) -> None:
    flag, file = tmp_path / "flag.log", tmp_path / "file.log"
    log.setup("info", access_log=str(flag))
    log.configure_access(str(file), sample=0.1, query="keep")
    assert log.access is not None
    assert (log.access.path, log.access.sample, log.access.query) == (str(flag), 0.1, "keep")
    log.configure_access(None)  # the file turns it off: the flag keeps it on
    assert log.access is not None
    assert log.access.path == str(flag)
    assert not file.exists()


@pytest.mark.usefixtures("isolated_setup")
def test_configure_access_unopenable_path_raises_and_changes_nothing(tmp_path: Path) -> None:
    good = tmp_path / "good.log"
    log.setup("info")
    log.configure_access(str(good))
    writer = log.access
    with pytest.raises(OSError):
        log.configure_access(str(tmp_path / "missing" / "x.log"))
    assert log.access is writer


# -- journald: the priority prefix ----------------------------------------------------------------


def _stderr_stream() -> str:
    stat = os.fstat(2)
    return f"{stat.st_dev}:{stat.st_ino}"


def test_stderr_is_journal_matches_device_and_inode_only() -> None:
    assert log.stderr_is_journal({"JOURNAL_STREAM": _stderr_stream()})
    device, inode = _stderr_stream().split(":")
    assert not log.stderr_is_journal({"JOURNAL_STREAM": f"{device}:{int(inode) + 1}"})
    assert not log.stderr_is_journal({"JOURNAL_STREAM": "garbage"})
    assert not log.stderr_is_journal({})


@pytest.mark.usefixtures("isolated_setup")
def test_setup_prefixes_the_syslog_priority_when_stderr_is_the_journal(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", _stderr_stream())
    log.setup("debug")
    app = logging.getLogger(log.APP_LOGGER + ".test")
    app.debug("d")
    app.info("i")
    app.warning("w")
    app.error("e")
    app.critical("c")
    lines = capfd.readouterr().err.splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert [orjson.loads(line[3:])["msg"] for line in lines] == ["d", "i", "w", "e", "c"]


@pytest.mark.usefixtures("isolated_setup")
def test_setup_plain_json_when_journal_stream_names_another_file(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    other = os.stat(tmp_path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{other.st_dev}:{other.st_ino}")
    log.setup("info")
    logging.getLogger(log.APP_LOGGER + ".test").warning("w")
    assert orjson.loads(capfd.readouterr().err)["msg"] == "w"
