"""Restart over a folder of files already done: `watcher run` from spawn to idle, beside `find -printf`.

Builds a folder of ``--files`` small files recorded as done in the store (through the store's API), then times
the daemon from spawn to READY=1 (its systemd readiness, sent once the first scan is done) and to idle (the
last CPU tick before it stays quiet), beside one `find DIR -printf '%s %T@ %i\n'` over the same tree. Also the
fixed start: spawn to READY on an empty folder (a restart: the store exists), beside `python -c pass`, and
when that start went idle (after READY it still loads the HTTP stack for the key check). What the files add is
printed milestone against milestone (READY against READY, idle against idle), and as the older measure, idle
against the empty folder's READY, which also charges the files with the key check every start does.

    python bench/restart.py [--files 10000] [--runs 3] [--tree PATH-OF-ANOTHER-CHECKOUT] [--web] [--poll]

``--poll`` watches the folders by polling (as a share is watched): the first scan's walk is also the poller's
first snapshot (it was a second walk beside the scan), and idle comes after both.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import _proc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tree", type=Path, default=_proc.HERE, help="the checkout whose watcher is measured")
    parser.add_argument("--web", action="store_true", help="with the web page on (its default)")
    parser.add_argument("--poll", action="store_true", help="watch the folders by polling, as a share is watched")
    args = parser.parse_args()
    tree = args.tree.resolve()
    _proc.use_tree(tree)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        full = root / "in"
        full.mkdir()
        paths = _proc.make_files(full, args.files)
        _proc.record_done(root / "state-full", full, paths)

        spawn = [_proc.python_spawn() for _ in range(args.runs)]
        fixed, fixed_cpu, fixed_idle = [], [], []
        empty = root / "empty"
        empty.mkdir()
        env = _proc.env_for(tree, root / "state-empty", empty, web=args.web, poll=args.poll)
        for run in range(args.runs + 1):  # the first run creates the store and marks the folder: not counted
            with _proc.running(tree, empty, env, root) as daemon:
                ready = daemon.wait_ready()
                if run:
                    fixed.append(ready)
                    fixed_cpu.append(daemon.cpu())
                    fixed_idle.append(daemon.wait_quiet())  # after READY: the key check loads the HTTP stack
                daemon.stop()
        ready, idle, finds, cpu, find_cpu = [], [], [], [], []
        env = _proc.env_for(tree, root / "state-full", full, web=args.web, poll=args.poll)
        for run in range(args.runs + 1):  # the first run marks the folder: not counted
            wall, used = _proc.find_pass(full)
            with _proc.running(tree, full, env, root) as daemon:
                ready_at, idle_at = daemon.wait_ready(), daemon.wait_quiet()
                if run:
                    finds.append(wall)
                    find_cpu.append(used)
                    ready.append(ready_at)
                    idle.append(idle_at)
                    cpu.append(daemon.cpu())
                daemon.stop()
    ms = lambda xs: f"{statistics.median(xs) * 1000:.0f} ms"  # noqa: E731
    mode = "polled" if args.poll else "native events"
    print(f"watcher from {tree}, web page {'on' if args.web else 'off'}, {mode}, median of {args.runs} runs")
    print(f"fixed start (empty folder): spawn -> READY {ms(fixed)}   | python -c pass: {ms(spawn)}")
    print(f"  CPU used by then: watcher {ms(fixed_cpu)}")
    print(
        f"restart over {args.files} done files: spawn -> READY {ms(ready)}, -> idle {ms(idle)}"
        f"   | find -printf: {ms(finds)}"
    )
    print(f"  CPU used by then: watcher {ms(cpu)}   | find: {ms(find_cpu)}")
    find = statistics.median(finds)
    # what the files add: the same milestone on both folders (READY: the first scan done; idle: all settled)
    scan = statistics.median(ready) - statistics.median(fixed)
    print(f"READY minus the empty folder's READY: {scan * 1000:.0f} ms = {scan / find:.1f} x find")
    rest = statistics.median(idle) - statistics.median(fixed)
    print(f"idle minus fixed start (READY): {rest * 1000:.0f} ms = {rest / find:.1f} x find")
    # the fixed start ends at READY, but a start goes on after it (the key check loads the HTTP stack) on an empty
    # folder too: idle minus the empty folder's idle leaves only what the files cost
    rest = statistics.median(idle) - statistics.median(fixed_idle)
    print(f"  the empty folder went idle after {ms(fixed_idle)}; idle minus that: {rest * 1000:.0f} ms", end="")
    print(f" = {rest / statistics.median(finds):.1f} x find")


if __name__ == "__main__":
    main()
