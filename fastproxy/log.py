"""Logging setup: JSON lines on stderr for the application log, and the access logger.

Imports only ``errors`` from fastproxy, plus ``orjson``; never asyncio, sockets, config or metrics.
Handlers are configured here and only here, called once by ``cli`` before the master forks, so
every worker inherits them. Modules log through ``logging.getLogger(__name__)``.

Invariants:

- One application record is one line on stderr: a JSON object (orjson) with the fixed keys
  ``ts`` (RFC 3339, UTC, milliseconds), ``level``, ``pid``, ``logger``, ``msg``, then any of
  ``listener``, ``conn_id``, ``decision``, ``status``, ``upstream``, ``dur_ms`` passed through
  ``extra=``, then ``exc`` when there is a traceback. Plain lines on stderr are what journald
  and container runtimes collect, so there is no syslog or file handler for this log.
- ``fastproxy.access`` never propagates into the application log. It writes nowhere unless
  ``setup`` is given ``access_log``: ``"-"`` for stdout, a path to append to a file.
- ``reopen`` (SIGUSR1, after logrotate moved the file) swaps each file handler's stream for a new
  one under the handler's lock, so no record is lost or written to the moved file.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping

import orjson

#: name of the application logger every module logs under
APP_LOGGER = "fastproxy"
#: name of the access logger; one record per request, off unless configured
ACCESS_LOGGER = "fastproxy.access"

#: optional keys copied from ``extra=`` into the JSON object, in this order
EXTRA_KEYS = ("listener", "conn_id", "decision", "status", "upstream", "dur_ms")

LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def format_ts(created: float) -> str:
    """Return ``created`` (seconds since the epoch) as RFC 3339 UTC with milliseconds."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


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


class AccessFormatter(logging.Formatter):
    """Format an access record: its ``msg`` is the mapping to write, ``ts`` added when absent.

    The access record builder passes one mapping per request (``logger.info(fields)``); any other
    message is written like an application record, so nothing is ever dropped silently.
    """

    def __init__(self) -> None:
        super().__init__()
        self._fallback = JsonFormatter()

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, Mapping) and not record.args:
            doc: dict[str, object] = {"ts": format_ts(record.created)}
            doc.update(record.msg)
            return _dump(doc)
        return self._fallback.format(record)


# Handlers this module installed, so a second ``setup`` replaces them instead of doubling lines.
_installed: list[tuple[logging.Logger, logging.Handler]] = []


def setup(level: str = "info", access_log: str | None = None) -> None:
    """Send the ``fastproxy`` log to stderr as JSON lines at ``level``; optionally the access log.

    ``access_log`` is ``"-"`` for stdout, a file path to append to, or None for no access log.
    Raises ``ValueError`` for an unknown level and ``OSError`` when the file cannot be opened.
    """
    try:
        numeric = LEVELS[level.lower()]
    except KeyError:
        known = ", ".join(LEVELS)
        raise ValueError(f"unknown log level {level!r} (known: {known})") from None

    access_handler: logging.Handler | None = None
    if access_log == "-":
        access_handler = logging.StreamHandler(sys.stdout)
    elif access_log is not None:
        access_handler = logging.FileHandler(access_log, mode="a", encoding="utf-8")

    for logger, handler in _installed:
        logger.removeHandler(handler)
        handler.close()
    _installed.clear()

    app = logging.getLogger(APP_LOGGER)
    app.setLevel(numeric)
    app_handler = logging.StreamHandler(sys.stderr)
    app_handler.setFormatter(JsonFormatter())
    app.addHandler(app_handler)
    _installed.append((app, app_handler))

    access = logging.getLogger(ACCESS_LOGGER)
    access.propagate = False
    if access_handler is None:
        # Without a handler and without propagation, logging's last-resort handler would print
        # access records to stderr; disabling the level is what "off" means.
        access.setLevel(logging.CRITICAL + 1)
    else:
        access.setLevel(logging.INFO)
        access_handler.setFormatter(AccessFormatter())
        access.addHandler(access_handler)
        _installed.append((access, access_handler))


def reopen() -> int:
    """Reopen every file this module logs to (after logrotate moved it); return how many."""
    count = 0
    for _logger, handler in _installed:
        if isinstance(handler, logging.FileHandler):
            # Always "a": setup opens access files for appending, and so must a reopen.
            stream = open(handler.baseFilename, "a", encoding=handler.encoding)  # noqa: SIM115 - the handler owns and closes it
            old = handler.setStream(stream)
            if old is not None:
                old.close()
            count += 1
    return count
