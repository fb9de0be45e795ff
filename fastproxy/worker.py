"""One worker process (SKELETON: contract for the master)."""

from __future__ import annotations

import socket
from collections.abc import Mapping

from fastproxy.config import Config


def run(
    config: Config,
    sockets: Mapping[str, socket.socket],
    admin_socket: socket.socket | None,
    heartbeat_fd: int,
) -> None:
    """Serve ``sockets`` (listener name -> bound, listening socket) until SIGTERM has drained.

    Writes one byte to ``heartbeat_fd`` about every second from the event loop; the first byte
    means "accepting". Raises if the worker cannot start.
    """
    raise NotImplementedError
