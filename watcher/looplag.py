"""How late the event loop wakes up: a blocking call on the loop shows here before it shows anywhere else.

:class:`LoopLag` is a small task that sleeps ``interval`` seconds again and again and measures how much later
than asked it woke. ``current`` is the last sample, ``max`` the worst since start (or since ``reset_max``).
The daemon exports ``current`` as the Prometheus gauge ``watcher_loop_lag_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("watcher.looplag")
INTERVAL = 0.25
WARN_AFTER = 1.0  # a single stall this long is logged (at most once per WARN_EVERY seconds)
WARN_EVERY = 60.0


class LoopLag:
    """Samples the running loop's wake-up delay every ``interval`` seconds (0.25-0.5 s is meant)."""

    def __init__(
        self,
        interval: float = INTERVAL,
        *,
        on_sample: Callable[[float], None] | None = None,
        warn_after: float = WARN_AFTER,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.interval = interval
        self.current = 0.0
        self.max = 0.0
        self.samples = 0
        self._on_sample = on_sample
        self._warn_after = warn_after
        self._clock = clock
        self._last_warning = -WARN_EVERY
        self._task: asyncio.Task[None] | None = None

    def start(self) -> LoopLag:
        """Start sampling on the running loop (call from a coroutine)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="looplag")
        return self

    async def stop(self) -> None:
        """Stop sampling; the last figures stay readable."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def reset_max(self) -> float:
        """Return the worst lag so far and start a new window."""
        worst, self.max = self.max, self.current
        return worst

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            asked = self._clock() + self.interval
            await asyncio.sleep(self.interval)
            self.record(max(0.0, self._clock() - asked))

    def record(self, lag: float) -> None:
        """One sample: update the figures, tell ``on_sample``, log a stall worth a look."""
        self.current = lag
        self.max = max(self.max, lag)
        self.samples += 1
        if self._on_sample is not None:
            try:
                self._on_sample(lag)
            except Exception as exc:  # a gauge failing must not end the monitor
                log.debug("looplag.callback_failed", error=f"{type(exc).__name__}: {exc}")
        now = self._clock()
        if lag >= self._warn_after and now - self._last_warning >= WARN_EVERY:
            self._last_warning = now
            log.warning(
                "loop.stalled",
                lag_seconds=round(lag, 3),
                reason="something blocked the event loop (a slow filesystem call or heavy work on it)",
                next="work goes on; if this repeats, check the watched shares and `watcher doctor`",
            )
