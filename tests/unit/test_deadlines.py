"""The worker's coarse timeouts, on a real uvloop loop: order, replacement, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from fastproxy.deadlines import RESOLUTION_S, Deadlines


class Owner:
    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, fired: list[str]) -> None:
        self.loop = loop
        self.name = name
        self.fired = fired
        self.deadline_tick = 0
        self.at = 0.0
        self.then: Callable[[], None] | None = None

    def on_deadline(self) -> None:
        self.at = self.loop.time()
        self.fired.append(self.name)
        if self.then is not None:
            self.then()


def run(main: Callable[[asyncio.AbstractEventLoop], Coroutine[Any, Any, None]]) -> None:
    async def wrapper() -> None:
        await main(asyncio.get_running_loop())

    uvloop.run(wrapper())


def test_fires_not_before_the_delay_and_in_order() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        fired: list[str] = []
        deadlines = Deadlines(loop)
        late, early = Owner(loop, "late", fired), Owner(loop, "early", fired)
        start = loop.time()
        deadlines.arm(late, 0.2)
        deadlines.arm(early, 0.05)
        assert len(deadlines) == 2
        await asyncio.sleep(0.6)
        assert fired == ["early", "late"]
        assert early.at - start >= 0.05 - 1e-3
        assert late.at - start >= 0.2 - 1e-3
        assert len(deadlines) == 0 and early.deadline_tick == 0

    run(main)


def test_rearm_replaces_and_cancel_forgets() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        fired: list[str] = []
        deadlines = Deadlines(loop)
        moved, cancelled = Owner(loop, "moved", fired), Owner(loop, "cancelled", fired)
        start = loop.time()
        deadlines.arm(moved, 0.05)
        deadlines.arm(moved, 0.3)  # replaces the first deadline
        deadlines.arm(cancelled, 0.05)
        deadlines.cancel(cancelled)
        deadlines.cancel(cancelled)  # twice is harmless
        assert len(deadlines) == 1
        await asyncio.sleep(0.15)
        assert fired == []
        await asyncio.sleep(0.5)
        assert fired == ["moved"] and moved.at - start >= 0.3 - 1e-3

    run(main)


def test_many_owners_share_a_tick_and_one_failure_spares_the_rest() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        fired: list[str] = []
        deadlines = Deadlines(loop)
        owners = [Owner(loop, f"o{i}", fired) for i in range(100)]

        def boom() -> None:
            raise RuntimeError("handler bug")

        owners[0].then = boom
        for owner in owners:
            deadlines.arm(owner, 0.05)
        await asyncio.sleep(0.4)
        assert sorted(fired) == sorted(o.name for o in owners)

    run(main)


def test_handler_may_cancel_a_peer_and_rearm_itself() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        fired: list[str] = []
        deadlines = Deadlines(loop)
        a, b = Owner(loop, "a", fired), Owner(loop, "b", fired)
        count = 0

        def first() -> None:
            nonlocal count
            count += 1
            other = b if fired[-1] == "a" else a
            deadlines.cancel(other)  # same tick: must not fire after this
            if count < 3:
                deadlines.arm(a if fired[-1] == "a" else b, 0.0)

        a.then = b.then = first
        deadlines.arm(a, 0.05)
        deadlines.arm(b, 0.05)
        await asyncio.sleep(0.5)
        assert len(fired) == 3 and len(set(fired)) == 1
        assert len(deadlines) == 0

    run(main)


def test_an_earlier_deadline_armed_later_still_fires_first() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        fired: list[str] = []
        deadlines = Deadlines(loop)
        deadlines.arm(Owner(loop, "slow", fired), 0.6)
        deadlines.arm(Owner(loop, "quick", fired), 0.05)
        await asyncio.sleep(0.3)
        assert fired == ["quick"]
        await asyncio.sleep(1.0)
        assert fired == ["quick", "slow"]

    run(main)


@pytest.mark.parametrize("delay", [0.0, RESOLUTION_S / 3, RESOLUTION_S, 2.5 * RESOLUTION_S])
def test_small_delays_fire_within_a_tick_or_two(delay: float) -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        fired: list[str] = []
        deadlines = Deadlines(loop)
        owner = Owner(loop, "x", fired)
        start = loop.time()
        deadlines.arm(owner, delay)
        for _ in range(200):
            if fired:
                break
            await asyncio.sleep(0.01)
        assert fired == ["x"]
        assert owner.at - start >= delay - 1e-3

    run(main)


def test_a_tick_emptied_by_cancels_takes_new_owners() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        fired: list[str] = []
        deadlines = Deadlines(loop)
        first = [Owner(loop, f"gone{i}", fired) for i in range(50)]
        for owner in first:
            deadlines.arm(owner, 0.1)
        for owner in first:
            deadlines.cancel(owner)
        assert len(deadlines) == 0
        late = Owner(loop, "late", fired)
        deadlines.arm(late, 0.1)  # very likely the emptied tick itself
        await asyncio.sleep(0.5)
        assert fired == ["late"]

    run(main)
