"""The pace of one service: an adaptive rate (halved on 429, recovered additively), the bucket that holds
requests to it, and a capped share of it for status polls, kept by appointment.

Why aiolimiter's ``AsyncLimiter`` is kept, and how its rate changes at run time: its ``max_rate`` can not be
changed safely while it runs. ``max_rate`` is only the bucket's size; the drain rate is computed once, in
``__init__``, into a private slot, so assigning ``max_rate`` changes the burst and not the rate (and a size
below the current level blocks every caller). Its public ``acquire(amount)`` is enough, though: the bucket
drains at the configured ceiling ``C`` units/s, and at a current rate ``r`` each request takes ``C / r``
units, so requests leave at ``r`` per second. The bucket holds one second at the ceiling (at least one
request): the burst watcher always allowed, and the largest price, which puts the rate's floor at
1 request/s (below that, a Retry-After pause does the waiting). A hand-written pacer without any burst was
tried in its place and measured no better, against a service counting with or without a burst.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable

from aiolimiter import AsyncLimiter

Clock = Callable[[], float]


class AdaptiveRate:
    """The rate one service is sent at: the configured ``ceiling``, halved on a 429, recovered additively.

    A 429 halves the current rate, once per round: answers to requests sent before the last cut do not cut
    again, as one burst of them reports one overload. Each second after the cut (or after the Retry-After
    pause that came with it) adds ``recovery`` requests/s, up to ``ceiling`` (AIMD, as TCP does).
    """

    def __init__(self, ceiling: float, *, floor: float, recovery: float, clock: Clock = time.monotonic) -> None:
        self.ceiling = ceiling
        self.floor = min(floor, ceiling)
        self.recovery = max(0.0, recovery)
        self.clock = clock
        self.cuts = 0
        self._base = ceiling
        self.since: float | None = None  # when recovery started, monotonic (None: never cut)
        self._cut_at = -math.inf  # when the last cut happened (monotonic)

    def current(self, now: float | None = None) -> float:
        """Requests per second allowed now."""
        if self.since is None:
            return self.ceiling
        now = self.clock() if now is None else now
        return min(self.ceiling, self._base + self.recovery * max(0.0, now - self.since))

    def cut(self, sent_at: float, *, resume_at: float | None = None) -> bool:
        """A request sent at ``sent_at`` was answered 429: halve the rate unless this round was already cut.

        Recovery starts at ``resume_at`` (the end of a Retry-After pause) when given. True when it was cut.
        """
        now = self.clock()
        if sent_at < self._cut_at:
            return False
        self._base = max(self.floor, self.current(now) / 2)
        self._cut_at = now
        self.since = max(now, resume_at or now)
        self.cuts += 1
        return True


class Bucket:
    """aiolimiter's leaky bucket draining at ``ceiling`` units/s, where a request at rate ``r`` costs
    ``ceiling / r`` units (see the module docstring)."""

    def __init__(self, ceiling: float) -> None:
        self.ceiling = ceiling
        self.capacity = max(1.0, ceiling)  # one second at the ceiling, at least one request
        self.floor = ceiling / self.capacity  # the slowest rate a price can express
        self._limiter = AsyncLimiter(self.capacity, self.capacity / ceiling)

    async def take(self, rate: float) -> None:
        """Wait until one request may leave at ``rate`` requests/s."""
        await self._limiter.acquire(min(self.capacity, self.ceiling / max(rate, 1e-9)))


class PollShare:
    """At most ``fraction`` of a service's rate for status polls, kept by appointment.

    A poll that would wait more than one slot is not kept waiting (it would hold a worker that new work
    needs): it gets an appointment, the next free slot, and the caller comes back then (``admit`` returns
    the seconds until it). A poll that arrives when an appointment has come due takes it. Every poll that
    goes then still passes the share's own bucket, so the share is a hard cap whatever the timing.
    """

    def __init__(self, fraction: float, ceiling: float) -> None:
        self.fraction = fraction
        self.bucket = Bucket(fraction * ceiling)
        self._next = -math.inf  # the next free slot (monotonic)
        self._appointments: list[float] = []

    def admit(self, rate: float, now: float) -> float | None:
        """None: this poll may go now (through :attr:`bucket`); else the seconds until its appointment."""
        if self._appointments and self._appointments[0] <= now:
            heapq.heappop(self._appointments)
            return None
        interval = 1.0 / max(self.fraction * rate, self.bucket.floor)
        slot = max(now, self._next)
        self._next = slot + interval
        if slot - now <= interval:
            return None
        heapq.heappush(self._appointments, slot)
        return slot - now

    @property
    def waiting(self) -> int:
        """Appointments handed out and not yet taken."""
        return len(self._appointments)
