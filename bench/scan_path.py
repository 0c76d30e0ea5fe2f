"""`watcher scan PATH` through a running daemon against a big store: what one of its polls costs, and the scan.

Builds a SQLite store of ``--files`` revisions (bench/scale.py's bulk build) plus a watched tree of
``--tree-files`` small files recorded as done, then prints the store call a poll of `scan PATH` makes (the jobs
under PATH: every current job read and filtered before, one indexed range now; both timed on the same store, in
this process) and the wall time of `scan PATH` sent to a `watcher run` on the tree (its hint, its settle, its
polls), medians of ``--scans``. ``--tree`` runs the daemon from another checkout (before/after).

    python bench/scan_path.py [--files 200000] [--tree-files 1000] [--scans 10] [--tree CHECKOUT]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _proc
from scale import build_store


def median_ms(n: int, call: Callable[[], Any]) -> tuple[float, Any]:
    """The median wall time of ``n`` calls, in ms, and the last call's answer."""
    samples, out = [], None
    for _ in range(n):
        start = time.perf_counter()
        out = call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=200_000, help="revisions in the store, the tree's included")
    parser.add_argument("--tree-files", type=int, default=1000)
    parser.add_argument("--scans", type=int, default=10, help="scans (and store calls) timed: medians")
    parser.add_argument("--tree", type=Path, default=_proc.HERE, help="the checkout whose daemon runs")
    args = parser.parse_args()
    from watcher.commands.common import under
    from watcher.control import ask
    from watcher.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tree, state = root / "tree", root / "state"
        tree.mkdir()
        state.mkdir()
        started = time.perf_counter()
        paths = _proc.make_files(tree, args.tree_files)
        build_store(state / "watcher.db", args.files - args.tree_files, tree, paths, time.time())
        print(f"built {args.files:,} revisions and {args.tree_files:,} files in {time.perf_counter() - started:.0f} s")
        target = paths[0].parent  # one folder of 100 files
        store = Store(state / "watcher.db")
        try:
            whole, jobs = median_ms(
                args.scans, lambda: [j for j in store.jobs_of_current() if under(j.file.path, [str(target)])]
            )
            scoped, scoped_jobs = median_ms(args.scans, lambda: store.jobs_under([str(target)]))
        finally:
            store.close()
        assert sorted(j.id for j in jobs) == sorted(j.id for j in scoped_jobs), "the two reads disagree"
        print(f"one poll's store read for {len(jobs)} jobs under {target.relative_to(root)} (medians of {args.scans}):")
        print(f"  every current job, filtered (before): {whole:.1f} ms | the jobs under the path: {scoped:.2f} ms")
        env = _proc.env_for(args.tree, state, tree)
        with _proc.running(args.tree, tree, env, root) as daemon:
            daemon.wait_ready(600)
            daemon.wait_quiet(timeout=600)
            scan_ms, answer = median_ms(args.scans, lambda: ask(state, {"command": "scan", "paths": [str(target)]}))
            print(f"`watcher scan {target.relative_to(root)}` through the daemon of {args.tree}: {scan_ms:.0f} ms "
                  f"(median of {args.scans}; exit {answer['exit']})")  # fmt: skip
            daemon.stop()


if __name__ == "__main__":
    main()
