"""What keeps a running daemon well, besides its lifecycle: the watchdog's pulse, the queue's metrics and status
line, pruning, the node's heartbeat, folder health, and what a start owes (the folders' markers, the recovery
after the last stop, the jobs a daily cap held back made due again under the cap now in force).

The pulse never waits on the store: it pings the systemd watchdog (and stamps /healthz) as long as the event loop
runs, whatever the database does. The chores reach the store only through its asynchronous port, so a store that
does not answer delays the chores, never the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import structlog

from watcher import __version__, markers
from watcher.config import FolderConfig, Settings
from watcher.detect.detector import Detector
from watcher.errors import ConfigError
from watcher.events import Subscriber
from watcher.fsutil import Leftovers, use_node
from watcher.metrics import NullMetrics
from watcher.names import display
from watcher.pace import backlog
from watcher.runner import Outcome, Runner
from watcher.sdnotify import Notifier
from watcher.store import TERMINAL, State
from watcher.store.aio import AsyncStore
from watcher.store.ports import StoreUnavailable

log = structlog.get_logger("watcher.daemon")
REFRESH_SECONDS = 60.0  # the queue is counted and folder health written at least this often
PRUNE_EVERY = 86400.0


class Graph(Protocol):
    """The parts of the object graph (watcher.app.App) housekeeping looks after."""

    @property
    def settings(self) -> Settings: ...

    @property
    def aio(self) -> AsyncStore: ...

    @property
    def runner(self) -> Runner: ...

    @property
    def node_id(self) -> str: ...

    @property
    def folders(self) -> dict[str, FolderConfig]: ...

    @property
    def detector(self) -> Detector | None: ...

    def claim_folders(self) -> list[markers.Ownership]: ...


class Housekeeping(Subscriber):
    """The daemon's pulse and chores; a subscriber too: files settled and jobs run here make the queue counted."""

    def __init__(
        self,
        notifier: Notifier,
        *,
        heartbeat: float,
        held: Callable[[], Iterable[str]] = tuple,
        caps: Callable[[], dict[str, float]] = dict,
    ) -> None:
        """``heartbeat``: seconds between chores (and pulses, or the watchdog's half-interval when shorter);
        ``held``: the services the daemon holds now, for the status line; ``caps``: each budget's daily cap in
        audio minutes now (for the backlog's ETA)."""
        self.notifier = notifier
        self.heartbeat = heartbeat
        self.held = held
        self.caps = caps
        self.metrics = NullMetrics()  # the daemon's, once it serves them
        self.alive_at = time.monotonic()
        self.started = time.time()  # the daemon's start: the backlog's rate is not measured over time before it
        self.changes = 0
        self._next_prune = 0.0
        self.leftovers: Leftovers | None = None  # the start-up sweep (:meth:`recover`), then the first scan's

    @property
    def interval(self) -> float:
        return min(self.heartbeat, self.notifier.watchdog_interval or self.heartbeat)

    def file_settled(self, folder: str, path: str) -> None:
        self.changes += 1

    def outcome(self, outcome: Outcome) -> None:
        self.changes += 1

    # -- the pulse ----------------------------------------------------------------------------------------------

    def alive(self) -> None:
        """The loop got round to the pulse: ping the systemd watchdog, and remember when (for /healthz)."""
        self.alive_at = time.monotonic()
        self.notifier.watchdog()

    def healthy(self) -> bool:
        """Whether the pulse ran lately, as the systemd watchdog would judge it (the page's /healthz)."""
        return time.monotonic() - self.alive_at <= 3 * self.interval

    async def pulse(self, stop: asyncio.Event) -> None:
        """Ping the watchdog every interval until ``stop``: it depends on the loop alone, never on the store."""
        while not stop.is_set():
            self.alive()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    # -- recovery at start ----------------------------------------------------------------------------------------

    async def recover(self, app: Graph) -> None:
        """Under the state folder's lock no earlier life can still be working: take back what it held, and
        remove the temp files a kill left behind (half-written sidecars, downloads, staging folders).
        A shared store (several nodes) gives back only what this node's earlier lives held (by its node ID), and
        refuses a start under a name another live node answers to (ConfigError)."""
        use_node(app.node_id)
        await app.aio.claim_node_name(app.settings.store.node_name, app.node_id)
        released, doubtful = await app.aio.release_node(app.node_id, app.runner.holder)
        if released:
            log.info("daemon.resumed", jobs=released, next="resuming work interrupted by the last stop")
        if doubtful:
            log.warning(
                "daemon.requests_in_doubt",
                operations=doubtful,
                next="paid requests cut off by the last stop: processing ones are held (`watcher status`), "
                "analysis ones are asked again",
            )
        await self.wake_capped(app)
        await self.prune(app)
        # the watched folders' leftovers are swept by the start-up scan, which lists them anyway (see
        # :meth:`leftovers_swept`); the sweep asks the store whether a node is alive from its own thread
        self.leftovers = Leftovers(mine=app.node_id, alive=app.aio.sync.node_alive)
        await asyncio.to_thread(self.leftovers.sweep, _written_folders(app.settings, walked=True))

    def leftovers_swept(self) -> None:
        """Once the start-up scan is done: say what the start-up sweep removed, if anything."""
        removed = self.leftovers.removed if self.leftovers is not None else []
        if removed:
            log.info("daemon.leftovers_removed", files=len(removed), example=display(removed[0]))

    async def wake_capped(self, app: Graph) -> None:
        """At every start and reload: the jobs a daily cap deferred are due again, since the cap may have been
        raised or removed; the gate checks the cap in force before any paid call, so one still reached defers
        them again at no cost."""
        woken = await app.aio.wake_capped()
        if woken:
            caps = {budget: minutes or None for budget, minutes in self.caps().items()}
            log.info(
                "cap.jobs_due",
                jobs=woken,
                daily_audio_minutes=caps,
                next=f"{woken} job(s) a daily cap deferred are due again under the caps now in force: a cap raised "
                "or removed lets them go on today, one still reached defers them again (nothing is paid)",
            )

    async def owned_folders(self, app: Graph) -> list[FolderConfig]:
        """The folders whose marker names our store (unmarked ones are marked ours); the others are left alone.
        The markers are read and written in a worker thread (a share may take seconds per call)."""
        folders, foreign = [], []
        claimed = await asyncio.to_thread(app.claim_folders)
        for owned, folder in zip(claimed, app.settings.folders, strict=True):
            if owned.ours:
                folders.append(folder)
                continue
            foreign.append(f"{display(owned.folder)} is owned by another store ({owned.owner})")
            log.warning(
                "folder.owned_by_another_store",
                folder=display(owned.folder),
                owner=owned.owner,
                next=f"not processing it; `watcher adopt {display(owned.folder)}` takes it over (see `watcher doctor`)",
            )
            await app.aio.set_folder_health(owned.folder, mode=None, reason=owned.reason, available=False)
        if not folders:
            raise ConfigError(
                f"nothing to watch: {'; '.join(foreign)} (its .watcher-folder marker names it); point [store] "
                "at that store, or take the folder over deliberately with `watcher adopt FOLDER` (see `watcher doctor`)"
            )
        return folders

    async def prune(self, app: Graph) -> None:
        """Forget old replaced and deleted revisions (results and paid IDs stay); once at start, then daily."""
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY
        days = app.settings.store.retention_days
        forgotten = await app.aio.prune(days)
        if forgotten:
            log.info("store.pruned", revisions=forgotten, older_than_days=days)

    # -- the chores ---------------------------------------------------------------------------------------------

    async def chores(self, app: Graph, stop: asyncio.Event) -> None:
        """Every heartbeat until ``stop``: a status line for the supervisor and the queue's metrics, pruning, the
        node's heartbeat, folder health into the store.

        Idle costs next to nothing: the queue is counted again only after a file settled or a job ran here (or
        once every ``REFRESH_SECONDS``, for what other nodes and commands changed), and a folder's health is
        written only when it changed (or as often, so `watcher status` sees it is current).
        """
        seen, refreshed = -1, 0.0
        health: dict[str, tuple[object, ...]] = {}
        while not stop.is_set():
            now = time.monotonic()
            stale = now - refreshed >= REFRESH_SECONDS
            if self.changes != seen or stale:
                seen = self.changes
                await self._count(app)
            await self.prune(app)
            await app.aio.heartbeat(
                app.settings.store.node_name,
                holder=app.runner.holder,
                version=__version__,
                folders=[str(f) for f in app.folders],
            )
            await self._folder_health(app, health, stale=stale)
            if stale:
                refreshed = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    async def _count(self, app: Graph) -> None:
        """The queue, through an index (finished jobs are not read; a pipeline with nothing open shows 0)."""
        counts: dict[str, dict[str, int]] = {name: {} for name in app.runner.pipelines}
        counts |= await app.aio.open_counts()
        self.metrics.queue(counts, TERMINAL)
        if self.metrics.wants_backlog:  # a few index reads, for the gauges only; kept as they were while away
            with contextlib.suppress(StoreUnavailable):
                self.metrics.backlog(await app.aio.call(backlog, app.aio.sync, self.caps(), since=self.started))
        waiting = sum(n for states in counts.values() for s, n in states.items() if s not in TERMINAL)
        failed = sum(states.get(State.FAILED, 0) for states in counts.values())
        held = "".join(f"; {service} paused" for service in sorted(self.held()))
        self.notifier.status(f"{waiting} queued, {app.runner.busy} in progress, {failed} failed{held}")

    async def _folder_health(self, app: Graph, health: dict[str, tuple[object, ...]], *, stale: bool) -> None:
        """Each watched folder's mode and availability into the store, when it changed (or when ``stale``)."""
        if app.detector is None:
            return
        for f in app.detector.describe():
            folder, mode, reason = str(f["folder"]), f["mode"], f["reason"]
            if f.get("missing"):  # never there: a typo in the path rather than an unmounted share
                mode, reason = "missing", "does not exist (never seen): check its path in [[folders]]"
            elif not f["available"]:
                mode = "gone"  # seen before: it stays "unavailable", and is known as seen after a restart
            seen_now = (mode, reason, bool(f["available"]))
            if health.get(folder) == seen_now and not stale:
                continue
            health[folder] = seen_now
            await app.aio.set_folder_health(
                folder,
                mode=None if mode is None else str(mode),
                reason=None if reason is None else str(reason),
                available=bool(f["available"]),
            )


def _written_folders(s: Settings, *, walked: bool = False) -> list[tuple[Path, bool]]:
    """Every folder watcher writes into, with whether its subfolders count too; ``walked``: but the watched
    folders the start-up scan walks just as far (their sidecars' temp files are swept by that walk)."""
    watched = {f.path: f.recursive for f in s.folders}
    roots = dict(watched)
    for extra in (s.archive.output_dir, s.sidecar.directory, *(f.output_dir for f in s.folders)):
        if extra is not None:
            roots[extra] = True
    for f in s.folders:
        for moved in (f.done_dir, f.failed_dir):
            if moved is not None:
                roots[moved] = True
    return [(root, deep) for root, deep in roots.items() if not (walked and watched.get(root) == deep)]
