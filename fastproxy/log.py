"""Logging setup: JSON lines on stderr for the application log, and the buffered access log.

Imports only ``errors`` from fastproxy, plus ``orjson``; never asyncio, sockets, config or metrics.
Handlers are configured here and only here, called once by ``cli`` before the master forks, so
every worker inherits them. Modules log through ``logging.getLogger(__name__)``.

Invariants:

- One application record is one line on stderr: a JSON object (orjson) with the fixed keys
  ``ts`` (RFC 3339, UTC, milliseconds), ``level``, ``pid``, ``logger``, ``msg``, then any of
  ``listener``, ``conn_id``, ``decision``, ``status``, ``upstream``, ``dur_ms`` passed through
  ``extra=``, then ``exc`` when there is a traceback. Plain lines on stderr are what journald
  and container runtimes collect, so there is no syslog or file handler for this log. When
  stderr is the journal (``JOURNAL_STREAM`` names stderr's device and inode, systemd's
  documented check), each line starts with the record's syslog priority, ``<3>`` to ``<7>``
  (sd-daemon(3)): journald strips it and sets ``PRIORITY``, so ``journalctl -p warning`` works
  and the message stays the JSON object.
- The access log is not a ``logging`` handler: ``setup`` creates one ``AccessLog`` writer,
  ``access`` (None when off), and a worker calls ``access.write(fields)`` once per request. A
  record is one line: ``{"ts": ..., <fields in the given order>}`` encoded by orjson straight to
  bytes. Lines are buffered and written like nginx's ``access_log path buffer=64k flush=1s``:
  one ``os.write`` when ``ACCESS_BUFFER_BYTES`` are pending, and ``flush()`` from the worker's
  one-second heartbeat and at its shutdown. So a record is at most about a second late, none is
  lost at a clean shutdown, and a worker killed without one (SIGKILL, SIGABRT after a missed
  heartbeat) loses what it had not flushed: at most a second's worth or 64 KiB.
- Every write holds complete lines only. The file is opened with ``O_APPEND`` and each flush is
  one ``write(2)``, so the lines of concurrent workers never interleave inside a line (for a
  regular file; on a pipe, only writes up to ``PIPE_BUF`` are atomic).
- A failed write never raises into the request path: the pending lines are dropped and the first
  failure of a run of them is reported once as an ERROR in the application log; the recovery is
  reported with the number of records lost.
- Workers inherit the writer across ``fork``. The master never writes access records, so its
  buffer is empty when it forks; in any case a forked child starts with an empty buffer
  (``os.register_at_fork``), so no line buffered before a fork is ever written twice.
- ``configure_access`` applies the file's ``[access_log]`` (path, ``sample``, ``query``) at
  start and at each reload; a path given to ``setup`` (``run --access-log``) wins over the
  file's. The writer carries the settings (``sample``, ``query``) the worker's record reads;
  ``sampled()`` keeps ``sample`` of the calls with no random number: a running credit, so a
  sample of 1 costs nothing and 0.25 logs exactly every fourth call.
- ``Throttle`` rate-limits a repeated WARNING (an upstream failing, connections shed): one
  line per key per interval, the next one carrying the count of those left out.
- ``reopen`` (SIGUSR1, after logrotate moved the file) flushes what is pending to the old file,
  then opens the path again and swaps the descriptor. Each process holds its own descriptor: the
  master reopens its own (for the workers it will fork), every worker must reopen its own.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import sys
import time
import weakref
from collections.abc import Mapping

import orjson

logger = logging.getLogger(__name__)

#: name of the application logger every module logs under
APP_LOGGER = "fastproxy"

#: optional keys copied from ``extra=`` into the JSON object, in this order
EXTRA_KEYS = ("listener", "conn_id", "decision", "status", "upstream", "dur_ms")

#: pending access-log bytes that trigger a write: nginx's ``access_log ... buffer=64k``
ACCESS_BUFFER_BYTES = 64 * 1024
#: how long a flush waits for a non-blocking output that is full (a pipe nobody reads) before it
#: drops the rest; shorter than the master's heartbeat timeout, so a stalled reader of stdout
#: costs records, not the worker
FLUSH_STALL_S = 1.0
#: the access log's value for "-": the process's standard output
STDOUT = "-"
_STDOUT_FD = 1

LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

_TS_SECONDS = "%Y-%m-%dT%H:%M:%S"
# '.mmmZ",' for every millisecond: one tuple index instead of a format per record.
_MILLIS: tuple[bytes, ...] = tuple(b'.%03dZ",' % n for n in range(1000))


#: syslog priorities of the levels (sd-daemon(3) prefixes when stderr is the journal)
SYSLOG_PRIORITIES: Mapping[int, int] = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
#: what a redacted query value becomes in the access log
REDACTED = b"REDACTED"


def format_ts(created: float) -> str:
    """Return ``created`` (seconds since the epoch) as RFC 3339 UTC with milliseconds."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime(_TS_SECONDS, time.gmtime(seconds)) + f".{millis:03d}Z"


def _dump(doc: Mapping[str, object]) -> str:
    # default=str: a value passed through extra= that orjson cannot encode (an enum, an
    # Address) is logged as its str() rather than losing the whole record.
    return orjson.dumps(doc, default=str).decode()


class JsonFormatter(logging.Formatter):
    """Format an application record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": format_ts(record.created),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = record.__dict__
        for key in EXTRA_KEYS:
            value = fields.get(key)
            if value is not None:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return _dump(doc)


class JournalFormatter(JsonFormatter):
    """The JSON line with its syslog priority first, ``<6>{...}``: what journald reads."""

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITIES.get(record.levelno)
        if priority is None:  # a custom level: the nearest standard one below it
            priority = 7 if record.levelno < logging.INFO else 6
            for level in (logging.WARNING, logging.ERROR, logging.CRITICAL):
                if record.levelno >= level:
                    priority = SYSLOG_PRIORITIES[level]
        return f"<{priority}>" + super().format(record)


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``JOURNAL_STREAM`` (``"DEVICE:INODE"``) names the file stderr is: systemd's
    documented check that stderr goes to the journal, not to a pipe or file a child got."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
        return (int(device), int(inode)) == (stat.st_dev, stat.st_ino)
    except (ValueError, OSError, AttributeError):
        return False


def redact_query(query: bytes) -> bytes:
    """``query`` (after the ``?``) with each value replaced by ``REDACTED``: ``a=1&b`` ->
    ``a=REDACTED&b``. The keys stay, so the record still says which parameters were sent."""
    parts = query.split(b"&")
    for index, part in enumerate(parts):
        key, equals, _ = part.partition(b"=")
        if equals:
            parts[index] = key + b"=" + REDACTED
    return b"&".join(parts)


def _open(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


class AccessLog:
    """A buffered writer of access records to a file (appended) or to stdout (``"-"``).

    Not thread-safe: one per process, used from its event loop. ``write`` costs an orjson dump
    and a buffer append; the system call happens once per ``ACCESS_BUFFER_BYTES`` and on
    ``flush``.
    """

    __slots__ = (
        "__weakref__",
        "_buf",
        "_credit",
        "_dropped",
        "_failing",
        "_fd",
        "_limit",
        "_prefix",
        "_second",
        "_stamp",
        "path",
        "query",
        "sample",
    )

    def __init__(self, path: str, *, buffer_bytes: int = ACCESS_BUFFER_BYTES) -> None:
        """Open ``path`` for appending (created 0o644), or use fd 1 for ``"-"``.

        Raises ``OSError`` when the file cannot be opened.
        """
        #: the path given, or ``"-"``
        self.path = path
        self._fd = _STDOUT_FD if path == STDOUT else _open(path)
        self._limit = buffer_bytes
        self._buf = bytearray()
        # The seconds part of ``ts``, recomputed when the second changes: strftime is the most
        # expensive step of a record and changes once a second.
        self._second = -1
        self._stamp = ""
        self._prefix = b""
        # a run of failed writes: reported once, and the records it lost
        self._failing = False
        self._dropped = 0
        #: the share of requests logged (``[access_log] sample``); errors are always logged
        self.sample = 1.0
        #: ``"redact"``, ``"keep"`` or ``"drop"`` (``[access_log] query``)
        self.query = "redact"
        self._credit = 0.0
        _writers.add(self)

    def sampled(self) -> bool:
        """True for ``sample`` of the calls, evenly spread: a credit of ``sample`` per call, a
        record each time it reaches 1. No random number; callers skip it when sample is 1."""
        credit = self._credit + self.sample
        if credit >= 1.0:
            self._credit = credit - 1.0
            return True
        self._credit = credit
        return False

    def write(self, fields: dict[str, object]) -> None:
        """Buffer one record: ``ts`` (now), then ``fields`` in their order; one JSON line.

        Values orjson cannot encode are written as their ``str()``. Writes the buffer when it
        reaches the size limit; never raises ``OSError``.
        """
        second, millis = divmod(time.time_ns() // 1_000_000, 1000)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(_TS_SECONDS, time.gmtime(second))
            self._prefix = b'{"ts":"' + self._stamp.encode()
        if fields and "ts" not in fields:
            # '{"ts":"...",' + the fields' own object without its "{": no dict copy, no str.
            body = orjson.dumps(fields, default=str, option=orjson.OPT_APPEND_NEWLINE)
            self._buf += self._prefix + _MILLIS[millis] + body[1:]
        else:
            # An empty record, or one that sets its own ts (kept first, as it always was).
            doc: dict[str, object] = {"ts": f"{self._stamp}.{millis:03d}Z"}
            doc.update(fields)
            self._buf += orjson.dumps(doc, default=str, option=orjson.OPT_APPEND_NEWLINE)
        if len(self._buf) >= self._limit:
            self.flush()

    def flush(self) -> None:
        """Write every pending line with one ``os.write`` (more only after a partial write).

        On an ``OSError`` the pending lines are dropped and the failure reported once through
        the application log; nothing is raised. A no-op when nothing is pending.
        """
        if not self._buf:
            return
        data, self._buf = self._buf, bytearray()
        with memoryview(data) as view:
            self._write_all(view)

    def _write_all(self, view: memoryview) -> None:
        written = 0
        deadline = 0.0
        try:
            while written < len(view):
                try:
                    count = os.write(self._fd, view[written:])
                except InterruptedError:
                    continue
                except BlockingIOError:
                    # stdout may be a non-blocking pipe that is full: wait for room, not forever.
                    now = time.monotonic()
                    deadline = deadline or now + FLUSH_STALL_S
                    if now >= deadline:
                        raise
                    poller = select.poll()
                    poller.register(self._fd, select.POLLOUT)
                    poller.poll((deadline - now) * 1000)
                    continue
                if count == 0:  # never for a file or a pipe; a loop that cannot end otherwise
                    raise OSError(errno.EIO, "write(2) wrote nothing")
                written += count
        except OSError as err:
            self._drop(view[written:], err)
            return
        if self._failing:
            logger.warning(
                "access log %s: writing again after dropping %d records", self.path, self._dropped
            )
            self._failing = False
            self._dropped = 0

    def _drop(self, unwritten: memoryview, err: OSError) -> None:
        # Records not (completely) written: the newlines left, one per record.
        self._dropped += bytes(unwritten).count(b"\n")
        if not self._failing:
            self._failing = True
            logger.error(
                "access log %s: write failed, dropping records until it works again: %s",
                self.path,
                err,
            )

    def reopen(self) -> bool:
        """Flush to the current file, then open ``path`` again and write there from now on.

        Returns False for stdout (nothing to reopen). Raises ``OSError`` when the path cannot be
        opened; the old descriptor is then kept, so records still go somewhere.
        """
        self.flush()
        if self.path == STDOUT:
            return False
        fd = _open(self.path)
        old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)
        return True

    def close(self) -> None:
        """Flush, then close the file (stdout stays open). Later writes are dropped, reported."""
        self.flush()
        fd, self._fd = self._fd, -1
        if fd >= 0 and self.path != STDOUT:
            os.close(fd)

    def forget_pending(self) -> None:
        """Drop pending lines unwritten: the parent of a fork owns them, not the child."""
        self._buf = bytearray()


# Every writer of this process, so a forked child drops what its parent had buffered.
_writers: weakref.WeakSet[AccessLog] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for writer in _writers:
        writer.forget_pending()


os.register_at_fork(after_in_child=_after_fork_in_child)


#: the access-log writer ``setup`` created, or None when the access log is off
access: AccessLog | None = None
#: the path ``setup`` was given (``run --access-log``): it wins over the file's ``[access_log]``
_forced_path: str | None = None

# Handlers this module installed, so a second ``setup`` replaces them instead of doubling lines.
_installed: list[tuple[logging.Logger, logging.Handler]] = []


def setup(level: str = "info", access_log: str | None = None) -> None:
    """Send the ``fastproxy`` log to stderr as JSON lines at ``level``; optionally the access log.

    ``access_log`` is ``"-"`` for stdout, a file path to append to, or None for no access log;
    it sets ``access``, closing the writer a previous call created. Raises ``ValueError`` for
    an unknown level and ``OSError`` when the file cannot be opened.
    """
    global access, _forced_path
    try:
        numeric = LEVELS[level.lower()]
    except KeyError:
        known = ", ".join(LEVELS)
        raise ValueError(f"unknown log level {level!r} (known: {known})") from None

    writer = None if access_log is None else AccessLog(access_log)

    for installed_logger, handler in _installed:
        installed_logger.removeHandler(handler)
        handler.close()
    _installed.clear()
    if access is not None:
        access.close()
    access = writer
    _forced_path = access_log

    app = logging.getLogger(APP_LOGGER)
    app.setLevel(numeric)
    app_handler = logging.StreamHandler(sys.stderr)
    app_handler.setFormatter(JournalFormatter() if stderr_is_journal() else JsonFormatter())
    app.addHandler(app_handler)
    _installed.append((app, app_handler))
    # asyncio (and uvloop through it) reports on its own logger: the same JSON lines, never the
    # plain-text "last resort" output of a logger without a handler
    aio = logging.getLogger("asyncio")
    aio.setLevel(max(numeric, logging.WARNING))
    aio.addHandler(app_handler)
    _installed.append((aio, app_handler))


def configure_access(path: str | None, *, sample: float = 1.0, query: str = "redact") -> None:
    """Apply ``[access_log]``: write to ``path`` (``"-"``: stdout; None: off) with ``sample``
    and ``query``. The path given to ``setup`` (``run --access-log``), if any, wins over
    ``path``; the settings apply to it too. A writer already on the path is kept (its buffer,
    its descriptor); another path is opened first, then the old writer flushed and closed.
    Raises ``OSError`` when the new file cannot be opened, and then changes nothing.
    """
    global access
    wanted = _forced_path if _forced_path is not None else path
    current = access
    if wanted is None:
        access = None
        if current is not None:
            current.close()
        return
    if current is None or current.path != wanted:
        writer = AccessLog(wanted)
        if current is not None:
            current.close()
        access = current = writer
    current.sample = sample
    current.query = query


class Throttle:
    """At most one log line per key per ``interval_s``; the rest are counted, not written.

    ``check(key, now)`` returns None when a line for ``key`` was written less than
    ``interval_s`` ago (the call is counted), else the number of calls left out since the last
    line (0 for the first), and the caller writes its line with that count. Keys are bounded
    by the caller (an upstream and a kind, a listener and a reason), never a peer's address;
    ``MAX_KEYS`` caps the table anyway.
    """

    __slots__ = ("_seen", "interval_s")

    MAX_KEYS = 1024

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        #: key -> (when its last line was written, calls left out since)
        self._seen: dict[object, tuple[float, int]] = {}

    def check(self, key: object, now: float) -> int | None:
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval_s:
            self._seen[key] = (seen[0], seen[1] + 1)
            return None
        if seen is None and len(self._seen) >= self.MAX_KEYS:
            self._seen.clear()
        self._seen[key] = (now, 0)
        return 0 if seen is None else seen[1]


def reopen() -> int:
    """Reopen the access-log file (after logrotate moved it); return how many files, 0 or 1.

    Pending records go to the old file first. A path that cannot be opened again is reported as
    an ERROR and writing goes on to the old file: a failed reopen never stops the caller.
    """
    writer = access
    if writer is None:
        return 0
    try:
        return int(writer.reopen())
    except OSError as err:
        logger.error(
            "access log %s: cannot reopen, still writing to the old file: %s", writer.path, err
        )
        return 0
