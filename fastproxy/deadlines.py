"""Coarse per-worker deadlines: one event-loop timer for every connection's timeout.

[I/O] Imports nothing from fastproxy; uses only the event loop's clock and ``call_at``.

Theory of operation
-------------------
A connection has at most one pending timeout at a time (head, keep-alive, first byte, body,
upstream read, WebSocket ping...), and on a busy keep-alive connection it changes several times
per request while almost never expiring. A ``loop.call_later`` per change allocates a timer
handle and touches libuv's timer heap each time; this module makes arming and cancelling a
set operation instead.

Deadlines are rounded *up* to ticks of ``RESOLUTION_S`` and kept in one bucket (a set of
owners) per tick. A min-heap of the ticks that have buckets drives a single ``call_at`` for the
earliest one. When it fires, every bucket that is due is taken out and each owner's
``on_deadline`` is called. A timeout therefore fires no earlier than asked and at most one tick
later. Cancelling removes the owner from its bucket at once, so a connection that is re-armed on
every request leaves nothing behind and memory stays bounded by the live connections.

Owners are objects with a writable ``deadline_tick`` attribute (0: nothing armed) and an
``on_deadline()`` method; ``ClientProtocol`` is one.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from typing import Protocol

logger = logging.getLogger(__name__)

#: timer granularity: timeouts fire at most this much late
RESOLUTION_S = 0.025
#: stands for a bucket whose owners all left before its tick: its set is freed at once (a busy
#: tick's set can be large) while the tick stays in the heap
_EMPTIED: frozenset[Owner] = frozenset()


class Owner(Protocol):
    deadline_tick: int

    def on_deadline(self) -> None: ...


class Deadlines:
    """Buckets of owners by due tick, served by one loop timer."""

    __slots__ = ("_buckets", "_handle", "_heap", "_loop", "_scheduled", "_time")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        #: the loop's clock, bound once (read on every arm)
        self._time = loop.time
        self._buckets: dict[int, set[Owner] | frozenset[Owner]] = {}
        self._heap: list[int] = []
        #: the tick the loop timer is set for (0: none)
        self._scheduled = 0
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """How many owners have a deadline armed."""
        return sum(len(bucket) for bucket in self._buckets.values())

    def arm(self, owner: Owner, delay: float) -> None:
        """Call ``owner.on_deadline()`` ``delay`` seconds from now (replacing its deadline)."""
        tick = math.ceil((self._time() + delay) / RESOLUTION_S)
        old = owner.deadline_tick
        if old == tick:
            return
        buckets = self._buckets
        if old:
            # (_leave, inline: arming replaces the deadline armed before, twice per request)
            left = buckets.get(old)
            if left:
                assert isinstance(left, set)
                left.discard(owner)
                if not left:
                    buckets[old] = _EMPTIED
        bucket = buckets.get(tick)
        if bucket is None:
            new: set[Owner] = set()
            buckets[tick] = bucket = new
            heapq.heappush(self._heap, tick)
            if not self._scheduled or tick < self._scheduled:
                self._schedule(tick)
        elif bucket is _EMPTIED:
            new = set()
            buckets[tick] = bucket = new  # the tick is in the heap already
        assert isinstance(bucket, set)
        bucket.add(owner)
        owner.deadline_tick = tick

    def cancel(self, owner: Owner) -> None:
        old = owner.deadline_tick
        if old:
            owner.deadline_tick = 0
            self._leave(old, owner)

    def _leave(self, tick: int, owner: Owner) -> None:
        bucket = self._buckets.get(tick)
        if bucket:
            assert isinstance(bucket, set)
            bucket.discard(owner)
            if not bucket:
                self._buckets[tick] = _EMPTIED

    def _schedule(self, tick: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._scheduled = tick
        self._handle = self._loop.call_at(tick * RESOLUTION_S, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._scheduled = 0
        # the loop may run a timer marginally before its time: due means "this tick or before"
        due = math.floor(self._loop.time() / RESOLUTION_S + 1e-6)
        heap = self._heap
        buckets = self._buckets
        ready: list[tuple[int, set[Owner] | frozenset[Owner]]] = []
        while heap and heap[0] <= due:
            tick = heapq.heappop(heap)
            bucket = buckets.pop(tick, None)
            if bucket:
                ready.append((tick, bucket))
        for tick, bucket in ready:
            for owner in bucket:
                if owner.deadline_tick != tick:
                    continue  # cancelled or re-armed by an earlier handler of this round
                owner.deadline_tick = 0
                try:
                    owner.on_deadline()
                except Exception:
                    logger.exception("timeout handler failed")
        # ticks whose buckets emptied stay in the heap until due; skip to the first live one
        while heap and not buckets.get(heap[0]):
            buckets.pop(heapq.heappop(heap), None)
        if heap and self._scheduled != heap[0]:
            self._schedule(heap[0])
