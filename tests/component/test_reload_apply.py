"""A worker applying a reload, in process on a real uvloop loop (no master, no fork).

A reload is applied whole or not at all: when something it needs is missing, nothing of the
worker's state changes, no socket it brought stays open, and the next reload still applies.
"""

from __future__ import annotations

import asyncio
import socket
import textwrap
import tomllib
from pathlib import Path

import prometheus_client
import pytest
import uvloop
from support.certs import Authority

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


def test_reload_apply_swaps_certificates_or_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a second WorkerState in this process: its metrics stay out of the global registry
    monkeypatch.setattr(prometheus_client.REGISTRY, "register", lambda collector: None)
    ca = Authority(tmp_path)
    first, second = ca.issue("one.example"), ca.issue("two.example")
    tls_line = f'tls = {{ cert = "{first.cert}", key = "{first.key}" }}\n'

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        state = worker.WorkerState(Snapshot.build(_config(BASE + tls_line), 1), loop)
        listener = state.listeners["sdk"]
        before = listener.tls
        assert before is not None
        # a key of another certificate: the worker refuses the generation and keeps its TLS
        broken = BASE + f'tls = {{ cert = "{first.cert}", key = "{second.key}" }}\n'
        reload = control.Reload(2, "fastproxy.toml", dump_config(_config(broken)), {})
        with pytest.raises(ConfigError, match="the key does not match the certificate"):
            await worker.apply_reload(state, reload)
        assert listener.tls is before and state.snapshot.generation == 1
        # the same files, new contents: a new ServerTls for new handshakes
        text = dump_config(_config(BASE + tls_line))
        await worker.apply_reload(state, control.Reload(2, "fastproxy.toml", text, {}))
        assert listener.tls is not None and listener.tls is not before
        assert listener.plan.scheme == b"https"
        # and TLS off: the listener's next connections are plain
        await worker.apply_reload(
            state, control.Reload(3, "fastproxy.toml", dump_config(_config(BASE)), {})
        )
        assert listener.tls is None and listener.plan.scheme == b"http"

    uvloop.run(scenario())
