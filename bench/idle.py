"""Idle CPU of a daemon polling a folder of files already done, beside one `find` pass per poll interval.

Builds ``--files`` small files recorded as done in the store (through its API), starts `watcher run` with the
folder polled every ``--interval`` seconds, waits until it is idle (READY=1, then quiet), and reads its CPU time
(utime + stime from /proc) over ``--seconds``. The reference is what one `find DIR -printf '%s %T@ %i\n'` pass
per interval would cost: the CPU of one pass (measured here, median of three) divided by the interval.

    python bench/idle.py [--files 10000] [--interval 5] [--seconds 60] [--tree PATH-OF-ANOTHER-CHECKOUT]
    python bench/idle.py --files 100000 --interval 30 --seconds 120
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _proc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=10000)
    parser.add_argument("--interval", type=float, default=5.0, help="poll_interval, seconds")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the idle CPU is measured")
    parser.add_argument("--tree", type=Path, default=_proc.HERE, help="the checkout whose watcher is measured")
    args = parser.parse_args()
    tree = args.tree.resolve()
    _proc.use_tree(tree)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "in"
        folder.mkdir()
        built = time.perf_counter()
        paths = _proc.make_files(folder, args.files)
        _proc.record_done(root / "state", folder, paths)
        print(f"{args.files} files built and recorded as done in {time.perf_counter() - built:.0f} s")
        env = _proc.env_for(tree, root / "state", folder, poll=True, interval=args.interval)
        with _proc.running(tree, folder, env, root) as daemon:
            ready = daemon.wait_ready()
            idle = daemon.wait_quiet()
            before, start = daemon.cpu(), time.perf_counter()
            time.sleep(args.seconds)  # sleep-ok: the measurement window
            used, elapsed = daemon.cpu() - before, time.perf_counter() - start
            errors = daemon.stop()
        find_cpu = statistics.median(_proc.find_pass(folder)[1] for _ in range(3))
    share = 100 * used / elapsed
    reference = 100 * find_cpu / args.interval
    print(f"watcher from {tree}: ready {ready:.2f} s, idle {idle:.2f} s after spawn")
    print(
        f"idle CPU polling {args.files} files every {args.interval:g} s, over {elapsed:.0f} s: "
        f"watcher {share:.2f} % of a core   | one find pass per interval: {reference:.2f} % "
        f"({find_cpu * 1000:.0f} ms a pass)"
    )
    if errors.strip():
        print("the daemon's warnings and errors:\n" + errors[-2000:])


if __name__ == "__main__":
    main()
