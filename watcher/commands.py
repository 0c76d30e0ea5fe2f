"""The short commands, as functions over the same object graph as the daemon: scan, dry run, status, retry,
pause and resume. The CLI parses arguments and prints; the web page will call these too."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from watcher.app import App, store_path
from watcher.app import open_store as open_adapter
from watcher.config import FolderConfig, Settings, service_identity
from watcher.errors import ConfigError
from watcher.fsutil import read_json_object, use_node
from watcher.runner import Outcome
from watcher.statelock import StateLock
from watcher.store import TERMINAL, Job, Store
from watcher.store.ports import StorePort

SCAN_SETTLE = 1.0


def open_store(settings: Settings) -> StorePort:
    """The store of a watcher that has run with these settings (ConfigError when there is none yet)."""
    if settings.store.url:
        return open_adapter(settings)
    path = store_path(settings)
    if not path.exists():
        raise ConfigError(f"no store at {path} yet: watcher has not run with state_dir = {settings.state_dir}")
    return Store(path)


def under(path: str, targets: Sequence[str]) -> bool:
    """True when ``path`` is one of ``targets`` or inside one of them."""
    return any(Path(path).is_relative_to(t) for t in targets)


def absolute(paths: Sequence[Path]) -> list[Path]:
    """The paths as the store records them: ``~`` expanded, made absolute against the working folder (never
    resolved). Every command calls this first, so `watcher scan .` means the folder it runs in."""
    return [Path(os.path.abspath(p.expanduser())) for p in paths]


async def scan(
    settings: Settings, paths: Sequence[Path], *, progress: bool = False
) -> tuple[int, list[dict[str, Any]]]:
    """`watcher scan` with no daemon running: register what is under ``paths`` now, process it, and report
    (exit code, problems). The state folder's lock is held throughout (a daemon starting meanwhile waits)."""
    paths = absolute(paths)
    folders, files = scan_targets(settings, paths)
    lock = StateLock(settings.state_dir)
    lock.acquire()
    try:
        app = App.build(settings, folders=folders)
    except BaseException:
        lock.release()
        raise
    try:
        use_node(app.node_id)
        app.store.claim_node_name(settings.store.node_name, app.node_id)  # refused while a live node has the name
        app.store.release_node(app.node_id, app.runner.owner)  # a shared store: take back only our own
        # The user says the files are there now: one quiet second (or less) confirms nothing is writing.
        folders = [f.model_copy(update={"settle_seconds": min(f.settle_seconds, SCAN_SETTLE)}) for f in folders]
        detector = app.make_detector(folders)
        for folder in folders:
            if any(str(p) == str(folder.path) for p in paths):
                await detector.scan(str(folder.path), live=True)  # the user says these are today's
        for f in files:
            detector.hint(str(f), live=True)
        await detector.settle_all()
        targets = [str(p) for p in paths]
        bar = _progress(app.store.pending(), progress)
        if bar is not None:
            from watcher.events import Subscriber

            class Tick(Subscriber):
                def outcome(self, outcome: Outcome) -> None:
                    if outcome.state in TERMINAL:
                        bar.update(1)

            app.events.subscribers.append(Tick())
        await app.runner.drain()
        if bar is not None:
            bar.close()
        return _scan_report(app.store, targets)
    finally:
        await app.aclose()
        lock.release()


def _scan_report(store: StorePort, targets: Sequence[str]) -> tuple[int, list[dict[str, Any]]]:
    """(1 if a file under ``targets`` failed else 0, every problem under them)."""
    problems = [
        {"path": p.path, "pipeline": p.pipeline, "state": p.state, "step": p.step, "error": p.error}
        for p in store.problems()
        if under(p.path, targets)
    ]
    return (1 if any(p["state"] == "failed" for p in problems) else 0), problems


SCAN_POLL = 0.2


async def scan_running(
    app: App, paths: Sequence[Path], *, progress: Callable[[int, int], Awaitable[None]] | None = None
) -> tuple[int, list[dict[str, Any]]]:
    """`watcher scan` through the running daemon: hint what is under ``paths`` to its detector, wait until each
    of their jobs has finished or waits on something that will not come now (a backoff, a paused service, a
    cap, a request in doubt), and report as :func:`scan` does. ``progress(done, total)`` is told as jobs end."""
    paths = absolute(paths)
    detector = app.detector
    if detector is None:
        raise ConfigError("the daemon is still starting: try again in a moment")
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
    while True:
        if not detector.idle():  # the detector's own loop settles the hinted files
            await asyncio.sleep(SCAN_POLL)
            continue
        jobs = [j for j in await asyncio.to_thread(app.store.jobs_of_current) if under(j.file.path, targets)]
        done = sum(j.state in TERMINAL for j in jobs)
        if progress is not None and (done, len(jobs)) != seen:
            seen = (done, len(jobs))
            await progress(done, len(jobs))
        held = await asyncio.to_thread(_held, app)
        if not any(j.state == "pending" and j.error_code is None and _why_held(j, held) is None for j in jobs):
            break
        await asyncio.sleep(SCAN_POLL)  # sleep-ok: polling the store for the runner's progress
    code, problems = await asyncio.to_thread(_scan_report, app.store, targets)
    for j in jobs:  # not failed, but not done either: say why, so that exit 0 does not look like "all done"
        why = _why_held(j, held) if j.state == "pending" and j.error_code is None else None
        if why is not None:
            waiting = {"path": j.file.path, "pipeline": j.pipeline, "state": "waiting", "step": j.step, "error": why}
            problems.append(waiting)
    return code, problems


def _held(app: App) -> tuple[set[str], dict[str, str]]:
    """(the paused folders, pipeline -> its paused service) of the running daemon."""
    paused = app.runner.paused_services()
    services = {name: p.service for name, p in app.runner.pipelines.items() if p.service in paused and p.service}
    return app.store.paused_folders(), services


def _why_held(job: Job, held: tuple[set[str], dict[str, str]]) -> str | None:
    folders, services = held
    if job.file.folder in folders:
        return "its folder is paused (`watcher resume` it)"
    if job.pipeline in services:
        return f"the {services[job.pipeline]} service is paused (`watcher status` says why)"
    return None


def scan_targets(settings: Settings, paths: Sequence[Path]) -> tuple[list[FolderConfig], list[Path]]:
    """Folders to walk and single files to hint; a path inside a configured folder keeps that folder's options."""
    folders: dict[str, FolderConfig] = {}
    files: list[Path] = []
    for raw in paths:
        path = Path(os.path.abspath(raw))
        if not path.exists():
            raise ConfigError(f"{path} does not exist")
        owner = settings.folder_for(path)
        if path.is_dir():
            folder = owner if owner is not None and owner.path == path else FolderConfig(path=path)
            if owner is not None and folder is not owner:
                folder = owner.model_copy(update={"path": path})
            folders[str(folder.path)] = folder
        else:
            folder = owner or FolderConfig(path=path.parent, recursive=False)
            folders.setdefault(str(folder.path), folder)
            files.append(path)
    return list(folders.values()), files


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="watcher scan")


def status(settings: Settings, *, daemon: dict[str, Any] | None = None, brief: bool = False) -> dict[str, Any]:
    """`watcher status`: the report as plain data (what `--json` prints). ``daemon``: the running daemon's own
    account (pid, since when, services paused, back-fill), None when none runs; ``brief``: see status.collect.
    While the store cannot be reached, the report says so (and since when) instead of waiting on it."""
    from watcher.status import collect_for
    from watcher.store.away import read_outage, unavailable

    outage = read_outage(settings.state_dir)
    if outage is not None:  # the running daemon cannot reach its store: say so rather than wait on it here
        return unreachable_report(settings, outage, daemon)
    try:
        store = open_store(settings)
        try:
            return collect_for(store, settings, daemon=daemon, web=web_state(settings), brief=brief)
        finally:
            store.close()
    except Exception as exc:
        if not unavailable(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        outage = {"unreachable_since": since, "error": first, "next": "the store did not answer this command"}
        return unreachable_report(settings, outage, daemon)


def unreachable_report(settings: Settings, outage: dict[str, Any], daemon: dict[str, Any] | None) -> dict[str, Any]:
    """The status document while the daemon's store is unreachable: the outage, and nothing the store would say."""
    from watcher import __version__

    return {
        "version": __version__,
        "state_dir": str(settings.state_dir),
        "daemon": daemon,
        "store_unreachable": outage,
        "nodes": [],
        "counts": {},
        "folders": [],
        "in_doubt": [],
        "adopted": {},
        "spend": {},
        "problems": [],
        "files": [],
        "web": web_state(settings),
    }


def web_state(settings: Settings) -> dict[str, Any] | None:
    """What the daemon last said about its page (state_dir/web.json): None when no daemon with the page runs."""
    doc = read_json_object(settings.state_dir / "web.json")
    if doc is None:
        return None
    try:
        os.kill(int(doc["pid"]), 0)  # a daemon that died without stopping leaves the file behind
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return doc


def retry(settings: Settings, paths: Sequence[Path], *, failed: bool = False, in_doubt: bool = False) -> int:
    """`watcher retry`: make failed, waiting or held jobs due now (see Store.retry); how many were reset.
    ``failed`` also takes the files waiting on a paused service (a refused key, no credits)."""
    if not paths and not failed and not in_doubt:
        raise ConfigError("say what to retry: PATH..., --failed or --in-doubt")
    store = open_store(settings)
    try:
        selected: list[str] | None = None
        if paths:
            targets = [str(p) for p in absolute(paths)]
            selected = [j.file.path for j in store.jobs_of_current() if under(j.file.path, targets)]
        return store.retry(paths=selected, failed=failed, in_doubt=in_doubt, waiting_on_service=failed)
    finally:
        store.close()


def resume_service(settings: Settings, pipelines: Sequence[str]) -> int:
    """Make the jobs of ``pipelines`` that wait on their paused service due now (its key was fixed)."""
    store = open_store(settings)
    try:
        return store.retry(paths=None, waiting_on_service=True, pipelines=list(pipelines))
    finally:
        store.close()


def current_path(settings: Settings, shown: str) -> str | None:
    """The path of the current file that :func:`watcher.names.display` shows as ``shown`` (the page and its API
    name files that way), or None. A name that is valid text is itself; any other is found among the files."""
    from watcher.names import find_shown

    store = open_store(settings)
    try:
        if store.current_version(os.path.abspath(shown)) is not None:
            return os.path.abspath(shown)
        real = find_shown(os.path.abspath(shown))  # a name with undecodable bytes: found in its folder on disk
        return real if real is not None and store.current_version(real) is not None else None
    finally:
        store.close()


def jobs_of(settings: Settings, path: str) -> list[dict[str, Any]]:
    """The jobs of a file's current version with attempts, step, state, error and what they recorded
    (for the web page's file view); empty when the store does not know the file."""
    store = open_store(settings)
    try:
        version = store.current_version(os.path.abspath(path))
        jobs = store.jobs_of_file(version.id) if version is not None else []
        return [
            {
                "pipeline": j.pipeline,
                "step": j.step,
                "state": j.state,
                "attempts": j.attempts,
                "error": j.last_error,
                "error_code": j.error_code,
                "data": j.data,
            }
            for j in jobs
        ]
    finally:
        store.close()


def pause(settings: Settings, folder: Path, *, paused: bool) -> str:
    """`watcher pause` / `resume`: kept in the store; returns the folder as recorded. Pausing a folder that is
    not configured is refused (it would stay in `watcher status` for good); resuming one is allowed, to clear it."""
    path = str(absolute([folder])[0])
    configured = [str(f.path) for f in settings.folders]
    store = open_store(settings) if settings.store.url else Store(store_path(settings))
    try:
        if path not in configured and (paused or path not in store.paused_folders()):
            shown = ", ".join(configured) or "none"
            raise ConfigError(f"{path} is not a configured folder (configured: {shown}); nothing was changed")
        store.set_paused(path, paused)
    finally:
        store.close()
    return path


def adopt(settings: Settings, folder: Path) -> tuple[str, str | None, str]:
    """`watcher adopt`: make this store the owner of ``folder``'s marker; (folder, previous owner, our store)."""
    from watcher import markers

    path = Path(os.path.abspath(folder.expanduser()))
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder")
    store = open_adapter(settings)
    try:
        mine = markers.store_id(store, settings.state_dir)
    finally:
        store.close()
    before = markers.read_marker(path)
    markers.adopt(path, mine, settings.store.node_name)
    return str(path), None if before is None else str(before.get("store")), mine


def _analysis_backend(settings: Settings) -> tuple[str, str]:
    """(which backend analyses: ``remote`` or ``local``, the key its results are stored under)."""
    from watcher.analyzers import choose_backend

    if not settings.analysis.enabled:
        return "remote", ""
    which, _ = choose_backend(settings.analysis)
    cfg = settings.analysis
    return which, "local" if which == "local" else service_identity("analysis", cfg.base_url, cfg.api_key)


def _pipelines(settings: Settings) -> tuple[list[str], list[str]]:
    """(the enabled pipelines, those of them that pay a service)."""
    enabled = (["analyze"] if settings.analysis.enabled else []) + (["archive"] if settings.archive.enabled else [])
    paid = [p for p in enabled if p != "analyze" or _analysis_backend(settings)[0] == "remote"]
    return enabled, paid


def backfill(settings: Settings, *, confirm: bool, limit: float | None = None) -> dict[str, Any]:
    """`watcher backfill`: the work the config added for files already there (watcher.backfill), with its price in
    audio minutes; ``confirm`` queues it, unless ``limit`` is given and the price is above it (then it waits).
    Only what was added since the store last caught up (state_dir/backfill.json) is owed."""
    from watcher import backfill as fill

    store = open_store(settings)
    try:
        enabled, paid = _pipelines(settings)
        key = _analysis_backend(settings)[1]
        plan = fill.find(settings, store, pipelines=enabled, analysis_key=key, since=fill.recorded(settings))
        cost = fill.price(plan, paid=paid)
        waits = limit is not None and cost["total_minutes"] > limit
        queued = fill.apply(store, plan) if confirm and plan.jobs and not waits else 0
        return {
            "jobs": plan.jobs,
            "what": plan.describe(),
            **cost,
            "queued": queued,
            "waiting": plan.jobs if plan.jobs and not queued else 0,
        }
    finally:
        store.close()


def dry_run(settings: Settings, paths: Sequence[Path]) -> Any:
    """`watcher scan --dry-run`: what would be asked and paid for, from the store opened read-only; first the
    back-fill (work the config added for files already there, queued at the next start or reload)."""
    from watcher import backfill as fill
    from watcher.dryrun import dry_run as plan

    which, analysis_key = _analysis_backend(settings)
    archive = settings.archive
    processing_key = service_identity("processing", archive.base_url, archive.api_key)
    store = None
    if store_path(settings).exists():
        try:
            store = Store(store_path(settings), readonly=True)
        except sqlite3.Error:
            store = None
    try:

        def priced(chosen: Sequence[Path]) -> Any:
            return plan(
                settings,
                chosen,
                cached_models=lambda sha: set(store.results_for(sha, analysis_key)) if store else set(),
                answered_operations=lambda sha: store.answered_operations(sha, processing_key) if store else set(),
                remote=which == "remote",
            )

        report = priced(absolute(paths))
        if store is not None:
            since = fill.recorded(settings)
            owed = fill.find(settings, store, pipelines=_pipelines(settings)[0], analysis_key=analysis_key, since=since)
            if owed.jobs:
                return _Reports(
                    [
                        (
                            f"back-fill ({owed.describe()}; queued at the next start or reload):",
                            priced([Path(p) for p in owed.all_paths()]),
                        ),
                        ("scan:", report),
                    ]
                )
        return report
    finally:
        if store is not None:
            store.close()


SPEND_FIELDS = (
    "day", "at", "service", "endpoint", "account", "operation", "sha256", "models", "seconds", "estimated", "kind",
    "outcome", "paid",
)  # fmt: skip


def _paid(outcome: str) -> str:
    """Whether the service bills a ledger line: ``yes`` (answered, partly or late), ``no`` (not sent, refused) or
    ``maybe`` (in doubt or still sending: the whole request may have reached it; the invoice tells)."""
    if outcome in ("not_sent", "refused"):
        return "no"
    return "maybe" if outcome in ("in_doubt", "sending") else "yes"


def spend(settings: Settings, first_day: str, last_day: str) -> list[dict[str, Any]]:
    """`watcher spend`: every ledger line of the UTC days ``first_day`` to ``last_day`` (ISO dates, inclusive),
    to hold against a service's invoice; ``paid`` says yes, no (not sent, refused) or maybe (in doubt)."""
    import datetime as dt

    for value in (first_day, last_day):
        try:
            dt.date.fromisoformat(value)
        except ValueError:
            raise ConfigError(f"{value!r} is not a date: give --from and --to as YYYY-MM-DD (UTC days)") from None
    if last_day < first_day:
        raise ConfigError(f"--to {last_day} is before --from {first_day}")
    store = open_store(settings)
    try:
        lines = store.ledger_lines(first_day, last_day)
    finally:
        store.close()
    return [
        {
            "day": line["day"],
            "at": dt.datetime.fromtimestamp(line["at"], dt.UTC).isoformat(timespec="seconds"),
            "service": line["service"],
            "endpoint": " ".join(str(line.get("endpoint") or "").split()[:2]),  # the service and its URL
            # the key's fingerprint (never the key): one invoice per account, also after a key changed
            "account": " ".join(str(line.get("endpoint") or "").split()[2:]).removeprefix("account:"),
            "operation": line["operation"],
            "sha256": line["sha256"],
            "models": line["models"],
            "seconds": round(float(line["seconds"]), 3),
            "estimated": bool(line["estimated"]),
            "kind": line["kind"],
            "outcome": line["outcome"],
            "paid": _paid(line["outcome"]),
        }
        for line in lines
    ]


class _Reports:
    """Several dry-run reports, each under its heading, rendered one after the other."""

    def __init__(self, parts: list[tuple[str, Any]]) -> None:
        self.parts = parts

    def render(self) -> str:
        return "\n".join(f"{heading}\n{report.render()}" for heading, report in self.parts)
