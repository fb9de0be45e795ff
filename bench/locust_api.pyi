"""The part of locust's API that ``locustfile.py`` uses, as typed stand-ins for type checking.

locust is a bench-only tool and is not installed where the test suite type-checks ``bench/``,
so ``locustfile.py`` imports these names from this stub under ``TYPE_CHECKING`` and from
locust at run time. There is no module behind it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

F = TypeVar("F", bound=Callable[..., None])

class Response(Protocol):
    status_code: int
    text: str

    def success(self) -> None: ...
    def failure(self, exc: object) -> None: ...
    def __enter__(self) -> Response: ...
    def __exit__(self, *exc: object) -> None: ...

class HttpSession(Protocol):
    def get(self, url: str, **kwargs: Any) -> Response: ...
    def post(self, url: str, **kwargs: Any) -> Response: ...

class EventHook(Protocol):
    def fire(self, **kwargs: Any) -> None: ...
    def add_listener(self, handler: F) -> F: ...

class Events(Protocol):
    request: EventHook
    init: EventHook
    init_command_line_parser: EventHook

class Environment(Protocol):
    parsed_options: argparse.Namespace
    events: Events

class HttpUser:
    host: str | None
    weight: int
    wait_time: Callable[..., float]
    environment: Environment
    client: HttpSession

    def on_start(self) -> None: ...
    def on_stop(self) -> None: ...

events: Events

def task(weight: int) -> Callable[[F], F]: ...
def between(low: float, high: float) -> Callable[..., float]: ...
