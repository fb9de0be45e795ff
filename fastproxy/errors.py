"""Exception hierarchy and exit codes.

Rule: this module imports nothing from fastproxy, so every other module may import it.

Being denied by policy is not an exception (``policy`` returns a ``Decision``), and protocol
violations by a peer are answered with a status, not raised out of the I/O layer. Exceptions here
are for configuration mistakes, upstream failures and the process life cycle.
"""

from __future__ import annotations

# Exit codes, chosen only by ``cli`` and the child entry point in ``master``.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_WORKER_BOOT = 3  # a worker failed to start: the master stops instead of respawning forever
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h

# Stable error codes of the local answers for faults (the JSON body's ``error``), beside the
# codes of the exchange (``upstream_failed`` 502, ``upstream_timeout`` 504, ...).
#: 503: the connection was over ``max_connections``, ``max_connections_per_client`` or the
#: worker's descriptors at accept
OVERLOADED = "overloaded"
#: 500: an unexpected exception in the worker ended the exchange (logged with its traceback)
INTERNAL_ERROR = "internal_error"


class FastproxyError(Exception):
    """Base class of every error fastproxy raises on purpose."""


class ConfigError(FastproxyError):
    """A configuration file or value is wrong.

    ``str()`` gives ``<file>: <dotted location>: <what is wrong>`` plus an optional ``(hint)``,
    e.g. ``fastproxy.toml: listeners.sdk.policy: unknown policy, got "x" (did you mean "y"?)``.
    """

    def __init__(self, msg: str, *, where: str, source: str = "", hint: str | None = None) -> None:
        self.msg = msg
        self.where = where
        self.source = source
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.where) if p]
        text = ": ".join([*parts, self.msg])
        if self.hint:
            text += f" ({self.hint})"
        return text

    def with_source(self, source: str) -> ConfigError:
        """Return the same error naming ``source`` (the file) in front."""
        return ConfigError(self.msg, where=self.where, source=source, hint=self.hint)


class UpstreamError(FastproxyError):
    """Talking to an upstream server failed."""


class UpstreamConnectError(UpstreamError):
    """The upstream refused or reset the connection, or the address is unreachable."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not connect or answer in time."""


class NoHealthyUpstream(UpstreamError):
    """Every server of the upstream is marked down: answered 503 ``no_healthy_upstream`` at
    once, without a connect attempt. Raised by the pool's pick, caught by the exchange."""

    #: the error code of the 503 the client gets
    code = "no_healthy_upstream"


class HaltServer(BaseException):
    """Stop the master with ``exit_code``.

    A ``BaseException``, so that no ``except Exception`` can swallow it (gunicorn's rule).
    """

    def __init__(self, reason: str, exit_code: int = 1) -> None:
        self.reason = reason
        self.exit_code = exit_code
        super().__init__(reason)
