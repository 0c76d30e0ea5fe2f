"""One bandwidth limit for every byte either service sends or receives (the ``bwlimit`` setting).

One :class:`Bandwidth` is shared by every request of a graph, so
all jobs together stay under it; a transport wrapper (:class:`ThrottledTransport`) meters request and response
bodies chunk by chunk through aiolimiter's token buckets, so a long transfer slows down or speeds up when the
timetable turns.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from watcher.config.bwlimit import Direction, Rate, Timetable

if TYPE_CHECKING:
    import httpx
    from aiolimiter import AsyncLimiter

def local_minute() -> int:
    """The minute of the local day now (the timetable is local time, ``TZ`` honoured)."""
    now = time.localtime()
    return now.tm_hour * 60 + now.tm_min


# The bucket holds this many seconds of the rate: a short burst, so a limit is met within a fraction of a second.
BURST_SECONDS = 0.1


class Bandwidth:
    """The limit every request of one graph shares: a token bucket per direction and rate in force."""

    def __init__(self, table: Timetable, *, minute: Callable[[], int] = local_minute) -> None:
        self.table = table
        self._minute = minute
        self._limiters: dict[tuple[Direction, float], AsyncLimiter] = {}

    @property
    def is_off(self) -> bool:
        return self.table.is_off

    def now(self) -> Rate:
        """The rate in force this minute."""
        return self.table.at(self._minute())

    def _limiter(self, direction: Direction, rate: float) -> AsyncLimiter:
        limiter = self._limiters.get((direction, rate))
        if limiter is None:
            from aiolimiter import AsyncLimiter

            # A new rate starts with a fresh bucket; an old one is dropped so the map stays as small as the table.
            self._limiters = {k: v for k, v in self._limiters.items() if k[0] != direction}
            limiter = AsyncLimiter(rate * BURST_SECONDS, BURST_SECONDS)
            self._limiters[(direction, rate)] = limiter
        return limiter

    async def take(self, direction: Direction, size: int) -> None:
        """Wait until ``size`` bytes may pass in ``direction`` (at once when that direction is off now)."""
        while size > 0:
            rate = self.now().of(direction)
            if rate is None:
                return
            limiter = self._limiter(direction, rate)
            step = min(size, max(1, int(limiter.max_rate)))
            await limiter.acquire(step)
            size -= step


@functools.cache
def _metered_class() -> Callable[[httpx.AsyncByteStream, Bandwidth, Direction], httpx.AsyncByteStream]:
    import httpx

    class Metered(httpx.AsyncByteStream):
        """A body stream whose chunks each wait for their bytes from the shared limit."""

        def __init__(self, inner: httpx.AsyncByteStream, bandwidth: Bandwidth, direction: Direction) -> None:
            self._inner = inner
            self._bandwidth = bandwidth
            self._direction = direction

        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for chunk in self._inner:
                await self._bandwidth.take(self._direction, len(chunk))
                yield chunk

        async def aclose(self) -> None:
            await self._inner.aclose()

    return Metered


def throttled(transport: httpx.AsyncBaseTransport, bandwidth: Bandwidth) -> httpx.AsyncBaseTransport:
    """``transport`` with every request and response body metered by ``bandwidth``."""
    import httpx

    metered = _metered_class()

    class ThrottledTransport(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if isinstance(request.stream, httpx.AsyncByteStream):
                request.stream = metered(request.stream, bandwidth, "up")
            response = await transport.handle_async_request(request)
            if isinstance(response.stream, httpx.AsyncByteStream):
                response.stream = metered(response.stream, bandwidth, "down")
            return response

        async def aclose(self) -> None:
            await transport.aclose()

    return ThrottledTransport()
