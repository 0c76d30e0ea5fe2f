"""One analysed file's CPU outside the HTTP client: registration, claim, precheck, the paid gate, each model's
result, the sidecar, the release, and the log lines (JSON at info, to /dev/null), for a burst of small files.

The analysis backend is an in-process stand-in that answers every model at once (as the emulator's fake results,
without a socket), marked paid so that every request passes the gate as with the real service. The runner runs
the jobs as its workers do (claim, ``run_job``), eight at a time. Printed: the process CPU per file and the SQL
statements per file (SQLite's trace callback), beside a reference measured in the same run: the CPU to read and
hash the same files (the least any analysis of them costs).

    .venv/bin/python bench/file_path.py [--files 2000] [--profile out.prof]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import write_tone
from watcher.app import StoreSink
from watcher.audiofile import signature
from watcher.config import FolderConfig, RetryConfig, SidecarConfig
from watcher.detect.detector import Settled
from watcher.emulator.analysis import _fake_results
from watcher.events import Events
from watcher.log import configure_logging, register_secrets
from watcher.pipelines.analyze import AnalyzePipeline
from watcher.runner import Runner
from watcher.services.analysis import AnalysisReport, ModelResult
from watcher.store import Store
from watcher.store.aio import AsyncStore

MODELS = ["key", "bpm_degara", "loudness_ebur128"]
WORKERS = 8


class Instant:
    """A paid analysis backend answering every model at once, in process."""

    name = "remote"
    key = "analysis http://127.0.0.1 account:bench"
    paid = True
    final_errors = False

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "base_url": "http://127.0.0.1"}

    async def analyze(
        self,
        audio: Any,
        models: Sequence[str],
        on_result: Callable[[ModelResult], Awaitable[None] | None],
        *,
        audio_url: str | None = None,
    ) -> AnalysisReport:
        report = AnalysisReport()
        digest = hashlib.sha256(audio.name.encode()).digest()
        for spec in models:
            result = ModelResult(spec, spec, "2.1", "corr-1", _fake_results(spec, digest))
            report.results[spec] = result
            told = on_result(result)
            if told is not None:
                await told
        return report


async def run(root: Path, files: list[Path]) -> None:
    store = Store(root / "state" / "watcher.db")
    aio = AsyncStore(store)
    pipeline = AnalyzePipeline(aio, Instant(), models=MODELS, sidecar=SidecarConfig())
    runner = Runner(aio, {"analyze": pipeline}, concurrency={"analyze": WORKERS}, retry=RetryConfig())
    sink = StoreSink(aio, [pipeline], wake=lambda: None, events=Events())
    folder = FolderConfig(path=root / "in")
    await sink.ready_many([Settled(folder, str(f), f.name, signature(f)) for f in files])  # one detector check's batch

    async def worker() -> None:
        while (job := await aio.claim("analyze", runner.holder)) is not None:
            await runner.run_job(pipeline, job)

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    await aio.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--profile", type=Path, help="write a cProfile of the run here")
    args = parser.parse_args()
    register_secrets(["bench-key-0123"])
    configure_logging("json", "info", stream=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the run
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        template = write_tone(root / "tone.wav", 0.25).read_bytes()
        files = []
        for i in range(args.files):
            path = root / "in" / f"{i:05d}.wav"
            path.write_bytes(template[:-8] + i.to_bytes(8, "little"))
            files.append(path)

        cpu = time.process_time()
        for f in files:
            hashlib.sha256(f.read_bytes()).hexdigest()
        reference = time.process_time() - cpu

        statements = 0
        import sqlite3

        connect = sqlite3.connect

        def counting(*a: Any, **kw: Any) -> sqlite3.Connection:
            def count(_: str) -> None:
                nonlocal statements
                statements += 1

            db = connect(*a, **kw)
            db.set_trace_callback(count)
            return db

        sqlite3.connect = counting  # type: ignore[assignment]
        profile = cProfile.Profile(time.thread_time) if args.profile else None  # the event loop thread only
        cpu = time.process_time()
        if profile is not None:
            profile.enable()
        asyncio.run(run(root, files))
        if profile is not None:
            profile.disable()
            profile.dump_stats(args.profile)
        spent = time.process_time() - cpu
        sqlite3.connect = connect  # type: ignore[assignment]
        done = sum(1 for f in files if Path(f"{f}.analysis.json").exists())
    if done != args.files:
        raise SystemExit(f"only {done} of {args.files} sidecars were written")
    n = args.files
    print(f"file path outside HTTP: {n} files of {len(template) / 1e3:.0f} kB, {len(MODELS)} models, {WORKERS} workers")
    per_file, floor = spent / n * 1000, reference / n * 1000
    print(f"CPU: {per_file:.2f} ms per file (reference, reading and hashing them: {floor:.2f} ms)")
    print(f"SQL statements: {statements / n:.1f} per file")


if __name__ == "__main__":
    main()
