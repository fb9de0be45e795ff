"""A worker applying a reload, in process on a real uvloop loop (no master, no fork).

A reload is applied whole or not at all: when something it needs is missing, nothing of the
worker's state changes, no socket it brought stays open, and the next reload still applies.
"""

from __future__ import annotations

import asyncio
import socket
import textwrap
import tomllib

import pytest
import uvloop

from fastproxy import control, worker
from fastproxy.config import Config, dump_config, parse_config
from fastproxy.errors import ConfigError
from fastproxy.runtime import Snapshot

BASE = """
[upstreams.app]
servers = ["127.0.0.1:9"]

[upstreams.old]
servers = ["127.0.0.1:10"]

[listeners.sdk]
bind = "127.0.0.1:0"
policy = "cobrowse-sdk"
upstream = "app"
"""


def _config(text: str) -> Config:
    return parse_config(tomllib.loads(textwrap.dedent(text)), "fastproxy.toml")


def _listening() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def test_reload_apply_is_all_or_nothing() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        state = worker.WorkerState(Snapshot.build(_config(BASE), 1), loop)
        old_pool = state.pools["old"]
        # generation 2 drops "old" and adds a listener, but comes without its socket
        text = BASE.replace('[upstreams.old]\nservers = ["127.0.0.1:10"]\n', "")
        text += '\n[listeners.more]\nbind = "127.0.0.1:0"\npolicy = "cobrowse-agent"\n'
        config = _config(text)
        stray = _listening()
        reload = control.Reload(2, "fastproxy.toml", dump_config(config), {"other": stray})
        with pytest.raises(ConfigError, match="no socket was sent for listeners more"):
            await worker.apply_reload(state, reload)
        assert state.snapshot.generation == 1
        assert state.pools["old"] is old_pool and not old_pool.retired
        assert set(state.listeners) == {"sdk"}
        assert stray.fileno() == -1  # closed
        # the same generation with its socket applies, from the unchanged state
        added = _listening()
        good = control.Reload(2, "fastproxy.toml", dump_config(config), {"more": added})
        await worker.apply_reload(state, good)
        assert state.snapshot.generation == 2
        assert "old" not in state.pools and old_pool.retired
        assert set(state.listeners) == {"sdk", "more"}
        server = state.listeners["more"].server
        assert server is not None
        server.close()
        await server.wait_closed()

    uvloop.run(scenario())
