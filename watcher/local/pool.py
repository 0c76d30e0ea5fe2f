"""A bounded process pool for local analysis, so CPU-bound work never runs on the event loop.

Workers are spawned (the daemon has threads, so no fork) and replaced after a number of files to give
memory back. A crashed worker becomes a per-model error for that file, and the next call gets a fresh pool.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import signal
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import structlog

from watcher.local.essentia_models import analyze_file

log = structlog.get_logger("watcher.local")
FILES_PER_WORKER = 20
CRASHED = "the local analysis worker died on this file (killed, out of memory, or a decoder fault)"


class LocalPool:
    """Runs :func:`analyze_file` in at most ``workers`` spawned processes; ``max_seconds`` refuses longer files."""

    def __init__(self, workers: int = 1, *, max_seconds: float | None = None) -> None:
        self.workers = max(1, workers)
        self.max_seconds = max_seconds
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                max_tasks_per_child=FILES_PER_WORKER,
                initializer=_ignore_interrupts,
            )
        return self._pool

    async def analyze(self, path: str, models: Sequence[str]) -> dict[str, Any]:
        """The analysis of one file (the shape :func:`analyze_file` returns), computed in a worker process."""
        loop = asyncio.get_running_loop()
        pool = self._executor()
        try:
            return await loop.run_in_executor(
                pool, functools.partial(analyze_file, path, list(models), max_seconds=self.max_seconds)
            )
        except BrokenProcessPool:
            log.error("local.worker_crashed", path=path, next="this file's models fail; a new pool serves the next")
            if self._pool is pool:  # calls that shared the broken pool must not close its replacement
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
            return {"results": {}, "errors": dict.fromkeys(models, CRASHED)}

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for monitoring and tests); empty before the first file."""
        processes = getattr(self._pool, "_processes", None) or {}
        return [p.pid for p in processes.values() if p.pid is not None]

    def close(self) -> None:
        """Stop the workers without waiting; pending files are cancelled. The pool can be used again."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def __aenter__(self) -> LocalPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop the workers and wait (off the event loop) until they have exited."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


def _ignore_interrupts() -> None:
    """Ctrl-C reaches the whole process group: only the daemon decides how its workers stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
