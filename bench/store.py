"""The store's hot path at scale: claim and next-due time per call in a store of a million jobs, beside the same
calls in a store of a thousand (the reference: a claim should cost the work due, not the size of the table).

Each store is filled in bulk (most jobs ended, one in a hundred pending for later, a handful due, a few of those
leased by another node: see ``tests/bigstore.py``). A claim takes a lease of zero seconds at a clock that moves
on by a millisecond per call, so the same handful stays due for every call and nothing but the claim is timed.
With ``--pg`` the same runs on a throwaway PostgreSQL cluster (as the tests start one), removed after.

    .venv/bin/python bench/store.py [--rows 1000000] [--calls 2000] [--pg]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.bigstore import FOLDER, FOLDER_ID, due_count, fill_postgres, fill_sqlite
from watcher.store import Store

REFERENCE_ROWS = 1_000


def per_call(fn: Callable[[int], Any], calls: int) -> float:
    """The median time of one call, in microseconds (calls timed one by one, after a few to warm up)."""
    for i in range(-min(20, calls), 0):
        fn(i)
    times = []
    for i in range(calls):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def measure(store: Any, now: float, calls: int) -> tuple[float, float]:
    """(claim, next_due) microseconds per call; every claim finds a job (the handful due stays due)."""

    def claim(i: int) -> None:
        job = store.claim("archive", "bench:1:1", lease=0.0, now=now + (i + 1000) * 0.001)
        assert job is not None, "nothing due: the store was not filled as expected"

    due = per_call(lambda i: store.next_due("archive"), calls)
    return per_call(claim, calls), due


def sqlite_rows(rows: int, calls: int, root: Path) -> float:
    now = time.time()
    path = root / f"store-{rows}.db"
    start = time.perf_counter()
    fill_sqlite(path, rows, now)
    built = time.perf_counter() - start
    store = Store(path)
    try:
        claim, due = measure(store, now, calls)
    finally:
        store.close()
    report("sqlite", rows, claim, due, built)
    return claim


def pg_rows(cluster: Any, rows: int, calls: int) -> None:
    from watcher.store.postgres import PostgresStore

    now = time.time()
    url = cluster.database()
    start = time.perf_counter()
    fill_postgres(url, rows, now)
    built = time.perf_counter() - start
    store = PostgresStore(url)
    store.use_folders({FOLDER: FOLDER_ID})
    try:
        claim, due = measure(store, now, calls)
    finally:
        store.close()
    report("postgres", rows, claim, due, built)


def report(kind: str, rows: int, claim: float, due: float, built: float) -> None:
    print(
        f"{kind:<9} {rows:>10,} jobs ({due_count(rows)['archive']:>2} archive due)   claim {claim:8.1f} µs/call   "
        f"next_due {due:8.1f} µs/call   (filled in {built:5.1f} s)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="jobs in the big store")
    parser.add_argument("--calls", type=int, default=2000, help="calls timed per figure")
    parser.add_argument("--pg", action="store_true", help="also on a throwaway PostgreSQL cluster")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="watcher-bench-store-") as tmp:
        for rows in sorted({REFERENCE_ROWS, args.rows}):
            sqlite_rows(rows, args.calls, Path(tmp))
    if args.pg:
        from tests.pg import Cluster, _bindir

        bindir = _bindir()
        if bindir is None:
            raise SystemExit("no PostgreSQL server installed (Debian: apt-get install postgresql)")
        cluster = Cluster(bindir).start()
        try:
            for rows in sorted({REFERENCE_ROWS, args.rows}):
                pg_rows(cluster, rows, max(1, args.calls // 4))
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
