"""Locust scenarios of real co-browsing traffic through fastproxy's two listeners.

- ``SdkDevice`` (public listener): registers a device, polls for sessions, checks in, holds
  a WebSocket for its whole life with a message every few seconds, and now and then tries a path
  the firewall must refuse (counted as a success only when it is refused with 403).
- ``AgentUser`` (internal listener): loads the single-page app and its static assets (a
  frontend route comes back as the SPA index), calls the API, fetches recordings and opens a
  session WebSocket for a short exchange.

WebSocket round trips are reported to locust as request type ``WS``. Run headless with CSV and
HTML reports, from the repository root, against the preset on loopback in front of the bench
origin (see ``bench/README.md``)::

    python -m bench.origin --port 8000 &
    fastproxy run &
    python -m locust -f bench/locustfile.py --headless -u 100 -r 20 -t 2m \\
        --csv bench/reports/cobrowse --html bench/reports/cobrowse.html \\
        --sdk-host http://127.0.0.1:8080 --agent-host http://127.0.0.1:8081
"""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid
from typing import TYPE_CHECKING, Any

from bench.wsclient import WsClient, WsError

if TYPE_CHECKING:
    from bench.locust_api import Environment, HttpUser, between, events, task
else:
    from locust import HttpUser, between, events, task

STATIC_ASSETS = (
    "/index.html",
    "/favicon.png",
    "/static/js/main.js",
    "/static/js/vendor.js",
    "/static/css/main.css",
    "/apps/present/manifest.json",
)


@events.init_command_line_parser.add_listener
def _options(parser: argparse.ArgumentParser, **_kw: Any) -> None:
    parser.add_argument(
        "--sdk-host", default="http://127.0.0.1:8080", help="the public (sdk) listener"
    )
    parser.add_argument(
        "--agent-host", default="http://127.0.0.1:8081", help="the internal (agent) listener"
    )


@events.init.add_listener
def _hosts(environment: Environment, **_kw: Any) -> None:
    options = environment.parsed_options
    if options is not None:
        SdkDevice.host = options.sdk_host
        AgentUser.host = options.agent_host


def ws_echo(user: HttpUser, ws: WsClient, name: str, message: dict[str, object]) -> None:
    """Send one message, wait for its echo, and report the round trip to locust."""
    start = time.perf_counter()
    text = json.dumps(message)
    exc: Exception | None = None
    try:
        ws.send_text(text)
        if ws.recv() != text.encode():
            exc = WsError("echo differs from the message")
    except (OSError, WsError) as err:
        exc = err
    user.environment.events.request.fire(
        request_type="WS",
        name=name,
        response_time=(time.perf_counter() - start) * 1000,
        response_length=len(text),
        exception=exc,
        context={},
    )
    if exc is not None:
        raise exc


class SdkDevice(HttpUser):
    """An end-user device running the SDK."""

    weight = 4
    wait_time = between(1, 3)

    def on_start(self) -> None:
        self.device = uuid.uuid4().hex
        self.ws: WsClient | None = None
        self.client.post("/api/1/devices", json={"id": self.device, "platform": "web"})
        self._open_socket()

    def _open_socket(self) -> None:
        assert self.host is not None
        start = time.perf_counter()
        exc: Exception | None = None
        try:
            self.ws = WsClient(self.host, f"/sockets/1/device/{self.device}")
        except (OSError, WsError) as err:
            self.ws, exc = None, err
        self.environment.events.request.fire(
            request_type="WS",
            name="/sockets/1/device/[id] connect",
            response_time=(time.perf_counter() - start) * 1000,
            response_length=0,
            exception=exc,
            context={},
        )

    def on_stop(self) -> None:
        if self.ws is not None:
            self.ws.close()

    @task(5)
    def poll_sessions(self) -> None:
        self.client.get(
            f"/api/1/sessions?device={self.device}&state=pending",
            name="/api/1/sessions?device=[id]",
        )

    @task(2)
    def check_in(self) -> None:
        self.client.get(f"/api/1/devices/{self.device}", name="/api/1/devices/[id]")

    @task(3)
    def socket_message(self) -> None:
        if self.ws is None:
            self._open_socket()
            return
        try:
            ws_echo(
                self,
                self.ws,
                "/sockets/1/device/[id] message",
                {"type": "heartbeat", "device": self.device, "at": time.time()},
            )
        except (OSError, WsError):
            self.ws.close()
            self.ws = None

    @task(1)
    def refused_path(self) -> None:
        path = random.choice(("/admin", "/api/1/agents", "/recording/1/x", "/static/app.js"))
        with self.client.get(path, name="[refused path]", catch_response=True) as resp:
            if resp.status_code == 403:
                resp.success()
            else:
                resp.failure(f"expected 403 from the sdk listener, got {resp.status_code}")


class AgentUser(HttpUser):
    """A support agent using the web frontend."""

    weight = 1
    wait_time = between(2, 5)

    def on_start(self) -> None:
        self.load_app()

    @task(1)
    def load_app(self) -> None:
        # a deep link: the agent listener answers frontend routes with the SPA index
        self.client.get(f"/dashboard/sessions/{uuid.uuid4().hex[:8]}", name="[frontend route]")
        for asset in STATIC_ASSETS:
            self.client.get(asset)

    @task(4)
    def api(self) -> None:
        self.client.get("/api/1/sessions?state=active", name="/api/1/sessions?state=active")
        self.client.get("/api/1/devices?limit=50", name="/api/1/devices?limit=50")
        if random.random() < 0.2:
            self.client.post("/api/1/sessions", json={"agent": "bench", "code": "123456"})

    @task(1)
    def recording(self) -> None:
        self.client.get(f"/recording/1/{uuid.uuid4().hex[:8]}/events", name="/recording/1/[id]")

    @task(2)
    def session_socket(self) -> None:
        assert self.host is not None
        session = uuid.uuid4().hex[:8]
        try:
            ws = WsClient(self.host, f"/sockets/1/session/{session}")
        except (OSError, WsError) as err:
            self.environment.events.request.fire(
                request_type="WS",
                name="/sockets/1/session/[id] connect",
                response_time=0,
                response_length=0,
                exception=err,
                context={},
            )
            return
        try:
            for i in range(5):
                ws_echo(
                    self,
                    ws,
                    "/sockets/1/session/[id] message",
                    {"type": "control", "session": session, "seq": i},
                )
        except (OSError, WsError):
            pass
        finally:
            ws.close()
