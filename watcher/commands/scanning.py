"""`watcher scan`: on its own (no daemon runs) or through the running daemon, and the report of both."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import structlog

from watcher.app import App
from watcher.commands.common import absolute, under
from watcher.config import FolderConfig, Settings
from watcher.errors import ConfigError
from watcher.fsutil import use_node
from watcher.names import display
from watcher.runner import Outcome
from watcher.statelock import StateLock
from watcher.store import TERMINAL, Job, State

P = ParamSpec("P")
T = TypeVar("T")
log = structlog.get_logger("watcher.scan")
SCAN_SETTLE = 1.0
# (exit code, problems, files already waiting moved to the front, paused folder -> its files recorded, not processed)
ScanReport = tuple[int, list[dict[str, Any]], int, dict[str, int]]


async def scan(settings: Settings, paths: Sequence[Path], *, progress: bool = False) -> ScanReport:
    """`watcher scan` with no daemon running: register what is under ``paths`` now, process it, and report
    (exit code, problems, files already waiting moved to the front, files left in paused folders). The state
    folder's lock is held throughout (a daemon starting meanwhile waits)."""
    paths = absolute(paths)
    folders, walks, files = scan_targets(settings, paths)
    lock = StateLock(settings.state_dir, role="`watcher scan`")
    lock.acquire()
    try:
        app = App.build(settings, folders=folders)
    except BaseException:
        lock.release()
        raise
    try:
        use_node(app.node_id)
        app.store.claim_node_name(settings.store.node_name, app.node_id)  # refused while a live node has the name
        app.store.release_node(app.node_id, app.runner.holder)  # a shared store: take back only our own
        # The user says the files are there now: one quiet second (or less) confirms nothing is writing.
        folders = [f.model_copy(update={"settle_seconds": min(f.settle_seconds, SCAN_SETTLE)}) for f in folders]
        detector = app.make_detector(folders)
        for root, start in walks:  # the user says these are today's
            await detector.scan(root, start=None if start == root else start, live=True)
        for f in files:
            detector.hint(str(f), live=True)
        await detector.settle_all()
        targets = [str(p) for p in paths]
        promoted = await promote(app, await app.aio.jobs_under(targets), targets)
        bar = _progress(app.store.pending(), enabled=progress)
        if bar is not None:
            from watcher.events import Subscriber

            class Tick(Subscriber):
                def outcome(self, outcome: Outcome) -> None:
                    if outcome.state in TERMINAL:
                        bar.update(1)

            app.events.subscribers.append(Tick())
        interrupted = asyncio.Event()
        draining = asyncio.ensure_future(app.runner.drain(interrupt=interrupted))
        with _on_signals(interrupted, draining), contextlib.suppress(asyncio.CancelledError):
            await draining  # cancelled by a second signal: the running jobs checkpoint now (cut bodies: not sent)
        if bar is not None:
            bar.close()
        jobs = await app.aio.jobs_under(targets)
        code, problems = _scan_report(jobs)
        waiting, paused = await _held_after(app, jobs)
        problems += waiting
        if paused:
            code = 1  # recorded, not processed: the work asked is not done
        if interrupted.is_set():
            left = app.store.pending()
            log.warning("scan.interrupted", left=left, next="running jobs were finished; the rest waits in the "
                        "store: run the scan again, or start the daemon")  # fmt: skip
            code = 1
        return code, problems, promoted, paused
    finally:
        await app.aclose()
        lock.release()


async def _held_after(app: App, jobs: Sequence[Job]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """After a scan without a daemon: of the jobs under its paths, those that wait on a paused folder or service
    (their lines, and paused folder -> how many files)."""
    held = await asyncio.to_thread(_held, app)
    return _waiting(jobs, held), _paused(jobs, held)


@contextlib.contextmanager
def _on_signals(came: asyncio.Event, draining: asyncio.Future[None]) -> Iterator[None]:
    """SIGINT (Ctrl-C) or SIGTERM during a scan without a daemon: set ``came``, so nothing new is claimed and the
    running jobs end (their paid answers recorded); a second signal cancels ``draining``: they checkpoint at once,
    as a daemon's second signal does (a request cut mid-body is recorded as not sent). Both are said in the log."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def on(sig: signal.Signals) -> None:
        if not came.is_set():
            log.warning("scan.stopping", signal=sig.name, next="finishing running jobs, claiming nothing new; "
                        "again to stop at once")  # fmt: skip
            came.set()
            return
        log.warning("scan.stopping_now", signal=sig.name, next="checkpointing running jobs now")
        draining.cancel()

    for sig in signals:
        loop.add_signal_handler(sig, on, sig)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def _scan_report(jobs: Sequence[Job]) -> tuple[int, list[dict[str, Any]]]:
    """(1 if one of ``jobs`` (those under the scan's paths) failed else 0, the problems among them: failed, held in
    doubt, or waiting to retry after an error, as `Store.problems` lists them)."""
    problems = [
        {"path": j.file.path, "pipeline": j.pipeline, "state": j.state, "step": j.step, "error": j.last_error}
        for j in jobs
        if j.state in (State.FAILED, State.IN_DOUBT) or (j.state == State.PENDING and j.last_error is not None)
    ]
    return (1 if any(p["state"] == State.FAILED for p in problems) else 0), problems


SCAN_POLL = 0.2


async def scan_running(
    app: App, paths: Sequence[Path], *, progress: Callable[[int, int], Awaitable[None]] | None = None
) -> ScanReport:
    """`watcher scan` through the running daemon: hint what is under ``paths`` to its detector, move what already
    waits there to the front once the hinted files settled, wait until each of their jobs has finished or waits
    on something that will not come now (a backoff, a paused service, a cap, a request in doubt), and report as
    :func:`scan` does. ``progress(done, total)`` is told as jobs end."""
    paths = absolute(paths)
    detector = app.detector
    if detector is None:
        raise ConfigError("the daemon is still starting: try again in a moment")
    _refuse_while_away(app)
    for path in paths:
        if not path.exists():
            raise ConfigError(f"{path} does not exist")
        if not any(path.is_relative_to(f) for f in app.folders):
            watched = ", ".join(app.folders) or "none"
            raise ConfigError(
                f"{path} is not in a folder the running daemon watches ({watched}): add it to [[folders]] and "
                "reload (`systemctl reload watcher`, or SIGHUP), or stop the daemon to scan it on its own"
            )
        detector.hint(str(path), is_dir=path.is_dir(), live=True)  # the user says these are today's
    targets = [str(p) for p in paths]
    seen = (-1, -1)
    promoted: int | None = None
    while True:
        _refuse_while_away(app)  # an outage met meanwhile: said at once, as the other commands say it
        if not detector.idle():  # the detector's own loop settles the hinted files
            await asyncio.sleep(SCAN_POLL)
            continue
        jobs = await _ask(app, app.store.jobs_under, targets)  # the files under the paths, not the store
        if promoted is None:  # settled: a changed file is a new (live) revision now, an unchanged one still waits
            promoted = await promote(app, jobs, targets)
        done = sum(j.state in TERMINAL for j in jobs)
        if progress is not None and (done, len(jobs)) != seen:
            seen = (done, len(jobs))
            await progress(done, len(jobs))
        held = await _ask(app, _held, app)
        if not any(j.state == State.PENDING and j.error_code is None and _why_held(j, held) is None for j in jobs):
            break
        await asyncio.sleep(SCAN_POLL)  # sleep-ok: polling the store for the runner's progress
    code, problems = _scan_report(jobs)  # the last poll's: the jobs the loop just found finished or held
    paused = _paused(jobs, held)
    return (1 if paused else code), problems + _waiting(jobs, held), promoted or 0, paused


def _refuse_while_away(app: App) -> None:
    """Raise StoreAway (exit 3, "the store cannot be reached now") when the daemon knows its store is away."""
    away = app.store_away()
    if away is not None:
        raise away


async def _ask(app: App, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn`` off the loop; StoreAway as soon as the daemon learns its store is away (the call is left to end in
    its thread, unheeded: a store that does not answer would hold the command for the pool's 30 s)."""
    _refuse_while_away(app)
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    while not (await asyncio.wait({task}, timeout=SCAN_POLL))[0]:
        away = app.store_away()
        if away is not None:
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its error is read, never raised
            raise away
    return task.result()


async def promote(app: App, jobs: Sequence[Job], targets: Sequence[str]) -> int:
    """`watcher scan PATH` counts as live, for files found earlier too: the pending jobs of the current revisions
    under ``targets`` go before the backlog (as a live registration's do, within the lanes' share). How many
    files were moved (logged; none when each was live already or has nothing pending)."""
    waiting = [j for j in jobs if j.state == State.PENDING and under(j.file.path, targets)]
    moved = await app.aio.promote([j.id for j in waiting]) if waiting else 0
    if moved:
        log.info(
            "scan.moved_to_front",
            paths=", ".join(display(t) for t in targets),
            files=moved,
            next="already waiting: claimed next, before the backlog (which keeps its share of the claims)",
        )
    return moved


def _held(app: App) -> tuple[set[str], dict[str, str]]:
    """(the paused folders, pipeline -> its paused service) of the running daemon."""
    paused = app.runner.paused_services()
    services = {name: p.service for name, p in app.runner.pipelines.items() if p.service in paused and p.service}
    return app.store.paused_folders(), services


def _waiting(jobs: Sequence[Job], held: tuple[set[str], dict[str, str]]) -> list[dict[str, Any]]:
    """The jobs not failed, but not done either, and why (so that an exit 0 does not read as "all done")."""
    out = []
    for j in jobs:
        why = _why_held(j, held) if j.state == State.PENDING and j.error_code is None else None
        if why is not None:
            out.append({"path": j.file.path, "pipeline": j.pipeline, "state": "waiting", "step": j.step, "error": why})
    return out


def _paused(jobs: Sequence[Job], held: tuple[set[str], dict[str, str]]) -> dict[str, int]:
    """Paused folder -> how many of these files wait in it: recorded, processed only once it is resumed."""
    files: dict[str, set[int]] = {}
    for j in jobs:
        if j.state == State.PENDING and j.file.folder in held[0]:
            files.setdefault(j.file.folder, set()).add(j.file.id)
    return {folder: len(ids) for folder, ids in sorted(files.items())}


def _why_held(job: Job, held: tuple[set[str], dict[str, str]]) -> str | None:
    folders, services = held
    if job.file.folder in folders:
        return "its folder is paused (`watcher resume` it)"
    if job.pipeline in services:
        return f"the {services[job.pipeline]} service is paused (`watcher status` says why)"
    return None


def scan_targets(
    settings: Settings, paths: Sequence[Path]
) -> tuple[list[FolderConfig], list[tuple[str, str]], list[Path]]:
    """What `watcher scan` without a daemon walks: the folders (a path inside a configured folder is that folder,
    so its files are recorded as the daemon records them, and its pause holds), the folders to walk as (folder,
    where in it the walk starts), and the single files to hint."""
    folders: dict[str, FolderConfig] = {}
    walks: list[tuple[str, str]] = []
    files: list[Path] = []
    for raw in paths:
        path = Path(os.path.abspath(raw))
        if not path.exists():
            raise ConfigError(f"{path} does not exist")
        configured = settings.folder_for(path)
        if path.is_dir():
            folder = configured or FolderConfig(path=path)
            folders.setdefault(str(folder.path), folder)
            walks.append((str(folder.path), str(path)))
        else:
            folder = configured or FolderConfig(path=path.parent, recursive=False)
            folders.setdefault(str(folder.path), folder)
            files.append(path)
    return list(folders.values()), walks, files


def _progress(total: int, *, enabled: bool) -> Any:
    """A progress bar over ``total`` files on stderr, or None (not ``enabled``, or nothing to do)."""
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="watcher scan")
