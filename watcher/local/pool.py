"""A bounded process pool for local analysis, so CPU-bound work never runs on the event loop.

Workers are spawned (the daemon has threads, so no fork) and replaced after a number of files to give
memory back. A crashed worker becomes a per-model error for that file, and the pool is rebuilt.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import structlog

from watcher.local.essentia_models import analyze_file

log = structlog.get_logger("watcher.local")
FILES_PER_WORKER = 20


class LocalAnalyzer:
    """Runs :func:`analyze_file` in at most ``workers`` processes."""

    def __init__(self, workers: int = 1, *, max_seconds: float = 1200.0) -> None:
        self.workers = max(1, workers)
        self.max_seconds = max_seconds
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                max_tasks_per_child=FILES_PER_WORKER,
            )
        return self._pool

    async def analyze(self, path: str, models: Sequence[str]) -> dict[str, Any]:
        """The analysis of one file, computed in a worker process."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor(), _run, path, list(models), self.max_seconds)
        except BrokenProcessPool:
            log.error("local.worker_crashed", path=path, next="the pool is rebuilt; this file's models fail")
            self.close()
            message = "the local analysis worker crashed on this file (out of memory, or a decoder fault)"
            return {"results": {}, "errors": dict.fromkeys(models, message)}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def __aenter__(self) -> LocalAnalyzer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _run(path: str, models: list[str], max_seconds: float) -> dict[str, Any]:
    return analyze_file(path, models, max_seconds=max_seconds)
