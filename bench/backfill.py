"""The back-fill's plan over a big store: the time and peak memory of ``watcher.backfill.find`` when a model was
added since the store last caught up (every done analysis is looked at, and owes the new model).

The store is filled in bulk with ``--files`` revisions of two jobs each (see ``tests/bigstore.py``), each with a
content hash; ``find`` then runs in a process of its own, so that its peak RSS is its own. With ``--pg`` the same
runs on a throwaway PostgreSQL cluster (as the tests start one), removed after.

    .venv/bin/python bench/backfill.py [--files 200000] [--pg]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.bigstore import FOLDER, fill_postgres, fill_sqlite

SINCE = {"pipelines": ["analyze", "archive"], "models": ["key"], "versions": ["original"], "folders": [FOLDER]}


def measure(kind: str, where: str) -> None:
    """In this process: open the store, time ``find`` and print its seconds and the peak RSS."""
    from watcher import backfill

    store: Any
    if kind == "sqlite":
        from watcher.store import Store

        store = Store(Path(where))
    else:
        from watcher.store.postgres import PostgresStore

        store = PostgresStore(where)
    settings: Any = SimpleNamespace(
        folders=[SimpleNamespace(path=Path(FOLDER))],
        analysis=SimpleNamespace(enabled=True, models=["key", "bpm_degara"]),
        archive=SimpleNamespace(enabled=True, wanted=lambda: ["original"]),
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    plan = backfill.find(
        settings, store, pipelines=["analyze", "archive"], analysis_key="remote", since=SINCE, exists=lambda _: True
    )
    took = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store.close()
    print(f"{kind}: find {took:.2f} s, peak RSS {peak / 1024:.0f} MiB (at the start {before / 1024:.0f} MiB); "
          f"{plan.jobs} jobs: {plan.describe()}")  # fmt: skip


def run(kind: str, where: str) -> None:
    subprocess.run([sys.executable, __file__, "--measure", kind, where], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--pg", action="store_true", help="also on a throwaway PostgreSQL cluster")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "backfill.db"
        fill_sqlite(path, 2 * args.files, time.time())
        import sqlite3

        with sqlite3.connect(path) as db:
            db.execute("UPDATE files SET sha256 = printf('%064d', id)")
        run("sqlite", str(path))
    if args.pg:
        import psycopg

        from tests.pg import Cluster, _bindir

        bindir = _bindir()
        if bindir is None:
            sys.exit("no PostgreSQL server installed")
        cluster = Cluster(bindir).start()
        try:
            url = cluster.database()
            fill_postgres(url, 2 * args.files, time.time())
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("UPDATE files SET sha256 = lpad(id::text, 64, '0')")
                conn.execute("VACUUM ANALYZE files")
            run("postgres", url)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
