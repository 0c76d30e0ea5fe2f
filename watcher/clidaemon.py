"""The CLI's commands that go to the running daemon through its control socket (watcher.control), and work on
the store directly only when the state folder's lock proves that none does: scan, status, web, backfill, pause,
resume, retry."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from watcher.config import Settings
from watcher.errors import ConfigError, StartupError
from watcher.log import configure_logging
from watcher.names import display

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_STARTUP = 0, 1, 2, 3
EXIT_PIPE = 141  # the reader of our output went away: what a shell reports for a command its pipe ended
STARTING_WAIT_SECONDS = 10.0  # how long a command waits for a daemon that holds the lock to open its socket


def ask_daemon(settings: Settings, request: dict[str, Any], on_progress: Any = None) -> tuple[bool, Any]:
    """(True, its answer) when a daemon runs on the state folder and took ``request``; (False, None) when none
    runs (then the caller works on the store directly). A refusal by the daemon is raised as CommandFailed."""
    from watcher.control import NoDaemon, ask
    from watcher.statelock import DAEMON, StateLock

    deadline, told = time.monotonic() + STARTING_WAIT_SECONDS, False
    while True:
        try:  # no look at the folder first: one we may not enter must be a permission error, not "no daemon"
            return True, ask(settings.state_dir, request, on_progress=on_progress)
        except NoDaemon:
            # The lock is held but nobody answers: a daemon between its lock and its socket (or a short command
            # holding the lock as its proof). Asked again until it answers or the lock is let go.
            holder = StateLock.holder(settings.state_dir)
            if holder is None or DAEMON not in holder or time.monotonic() >= deadline:
                return False, None  # no_daemon then says who holds the lock
            if not told:
                print(f"watcher: {holder} holds {settings.state_dir} but does not answer yet; waiting up to "
                      f"{STARTING_WAIT_SECONDS:g} s", file=sys.stderr, flush=True)
                told = True
            time.sleep(0.1)  # sleep-ok: a socket has no "wait until it listens"; asked again until the deadline


@contextlib.contextmanager
def no_daemon(settings: Settings, *, hold: bool = True) -> Any:
    """Work on the store directly: only while the state folder's lock proves that no daemon runs (``hold``: keep
    the lock for the whole command; else it is taken for an instant, as a proof)."""
    from watcher.statelock import DAEMON, StateLock

    if not settings.state_dir.is_dir():
        yield
        return
    lock = StateLock(settings.state_dir)
    try:
        lock.acquire()
    except StartupError:
        holder = StateLock.holder(settings.state_dir) or "another process"
        if DAEMON not in holder:  # a scan without a daemon, a restore, a migration: it ends on its own
            raise StartupError(
                f"{holder} is working on the store in {settings.state_dir} directly; run this again when it ends"
            ) from None
        raise StartupError(
            f"{holder} holds the state folder {settings.state_dir}, but its control socket does not answer (is it "
            "still starting? try again; an older watcher has no socket: restart it)"
        ) from None
    if not hold:
        lock.release()
    try:
        yield
    finally:
        lock.release()


def run_or_fail(settings: Settings, request: dict[str, Any], on_progress: Any = None) -> tuple[bool, Any]:
    """:func:`ask_daemon`, with the daemon's refusal turned into the CLI's message and exit code."""
    from watcher.control import CommandFailed

    try:
        return ask_daemon(settings, request, on_progress)
    except CommandFailed as exc:
        raise Exit(str(exc), exc.exit_code) from None


class Exit(Exception):
    """A message for stderr and the exit code that goes with it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def cmd_scan(args: argparse.Namespace, settings: Settings) -> int:
    """`watcher scan`: by the running daemon (its progress as a bar), else here; the problems on stderr."""
    configure_logging(args.log_format, settings.log_level)
    from watcher import commands

    paths = commands.absolute(args.paths)  # the daemon runs elsewhere: `scan .` means here
    if args.dry_run:
        print(commands.dry_run(settings, paths).render(), end="")
        return EXIT_OK
    progress = sys.stderr.isatty() and not args.no_progress
    if progress and args.log_level is None and settings.log_level == "info":
        configure_logging(args.log_format, "warning")  # on a terminal the bar tells the progress, not a line per file
    bar = Bar() if progress else None
    try:
        ran, answer = run_or_fail(
            settings, {"command": "scan", "paths": [str(p) for p in paths]}, bar.update if bar else None
        )
    finally:
        if bar is not None:
            bar.close()
    if ran:
        code, problems, promoted = int(answer["exit"]), answer["problems"], int(answer.get("promoted", 0))
        paused: dict[str, int] = answer.get("paused") or {}
    else:
        with no_daemon(settings, hold=False):
            pass  # the direct scan takes the lock itself, for as long as it runs
        code, problems, promoted, paused = asyncio.run(commands.scan(settings, paths, progress=progress))
    if promoted:
        print(f"{promoted} file(s) already waiting moved to the front")
    for p in problems:
        word = "FAILED" if p["state"] == "failed" else p["state"].upper()
        print(f"{word} {display(p['path'])} ({p['pipeline']}, {p['step']}): {p['error']}", file=sys.stderr)
    for folder, files in paused.items():
        resume = f"watcher resume {shlex.quote(display(folder))}"
        print(f"watcher: {display(folder)} is paused: {files} file(s) recorded but not processed; they are "
              f"processed when it is resumed (`{resume}`)", file=sys.stderr)  # fmt: skip
    return code


class Bar:
    """The progress bar of a scan that the daemon runs (tqdm, on stderr), fed by its progress messages."""

    def __init__(self) -> None:
        self._bar: Any = None

    def update(self, progress: dict[str, Any]) -> None:
        total, done = int(progress.get("total", 0)), int(progress.get("done", 0))
        if total == 0:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, unit="file", desc="watcher scan")
        self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def cmd_status(settings: Settings, *, as_json: bool, all_files: bool) -> int:
    from watcher.commands import status
    from watcher.status import render

    brief = not (as_json or all_files)  # the text's first files and problems, read through indexes
    ran, report = run_or_fail(settings, {"command": "status", "brief": brief})
    if not ran:
        with no_daemon(settings, hold=False):
            report = status(settings, brief=brief)
    print(json.dumps(report, indent=2, default=str) if as_json else render(report, all_files=all_files))
    return EXIT_OK


def cmd_web(settings: Settings) -> int:
    ran, answer = run_or_fail(settings, {"command": "web"})
    if not ran:
        print(f"watcher: no daemon runs on {settings.state_dir}: start one (`watcher run`)", file=sys.stderr)
        return EXIT_FAILED
    if not answer["running"]:
        print(f"the page is not running: {answer['problem']}", file=sys.stderr)
        return EXIT_FAILED
    print(f"page: {answer['url']}")
    print(f"log in: {answer['login']}")
    return EXIT_OK


def cmd_backfill(settings: Settings, *, yes: bool) -> int:
    from watcher.commands import backfill

    ran, found = run_or_fail(settings, {"command": "backfill", "yes": yes})
    if not ran:
        with no_daemon(settings):
            found = backfill(settings, confirm=yes)
    if not found["jobs"]:
        print("nothing to back-fill: every file has what the config asks for")
        return EXIT_OK
    price = ", ".join(f"{service} {m:g}" for service, m in found["minutes"].items()) or "none"
    unknown = f" (+{found['unknown_duration']} file(s) of unknown length)" if found["unknown_duration"] else ""
    print(f"back-fill: {found['jobs']} job(s): {found['what']}")
    print(f"price: {found['total_minutes']:g} audio minutes ({price}){unknown}; daily caps apply")
    if found["queued"]:
        print(f"queued {found['queued']} job(s)")
    elif not yes:
        print("nothing queued: `watcher backfill --yes` queues it")
    return EXIT_OK


def cmd_pause(settings: Settings, folder: Path, *, paused: bool) -> int:
    from watcher.commands import absolute, pause

    where = absolute([folder])[0]
    ran, answer = run_or_fail(settings, {"command": "pause" if paused else "resume", "folder": str(where)})
    if ran:
        path = answer["folder"]
    else:
        with no_daemon(settings):
            path = pause(settings, where, paused=paused)
    print(f"{display(path)}: {'paused' if paused else 'resumed'}")
    if paused:
        print("new files are still recorded; nothing is processed until `watcher resume`")
    return EXIT_OK


def cmd_retry(settings: Settings, paths: list[Path], *, failed: bool, in_doubt: bool) -> int:
    from watcher.commands import absolute, retry

    targets = absolute(paths)
    if not targets and not failed and not in_doubt:
        raise ConfigError("say what to retry: PATH..., --failed or --in-doubt")
    request = {"command": "retry", "paths": [str(p) for p in targets], "failed": failed, "in_doubt": in_doubt}
    ran, answer = run_or_fail(settings, request)
    if ran:
        n = int(answer["retried"])
    else:
        with no_daemon(settings):
            n = retry(settings, targets, failed=failed, in_doubt=in_doubt)
    print(f"{n} job(s) will be retried" + ("" if n else " (nothing matched)"))
    return EXIT_OK
