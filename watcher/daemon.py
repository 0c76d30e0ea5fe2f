"""The daemon's lifecycle, and nothing else: the state folder's lock, signals, reload, heartbeat, shutdown.

Start-up: lock the state folder, build the object graph (watcher.app), give back leases and recover paid
requests cut off by the last stop. Main loop: detector, runner and heartbeat side by side. Shutdown: the first
SIGTERM/SIGINT stops claiming work and lets in-flight jobs finish for a grace period, then checkpoints them;
a second signal checkpoints at once. SIGHUP rebuilds the graph from re-read settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from watcher import __version__
from watcher.app import App
from watcher.config import FolderConfig, Settings, reveal
from watcher.control import ControlServer, socket_path
from watcher.errors import ConfigError
from watcher.events import MetricsEvents, Subscriber, WebhookEvents
from watcher.fsutil import StateLock, raise_open_files_limit, sweep_temp, use_node
from watcher.looplag import LoopLag
from watcher.metrics import Metrics, NullMetrics
from watcher.names import display
from watcher.pace import backlog, caps_of
from watcher.runner import Outcome
from watcher.sdnotify import Notifier, NullNotifier
from watcher.steering import Steering
from watcher.store import TERMINAL
from watcher.webhooks import WebhookSender

T = TypeVar("T")
log = structlog.get_logger("watcher.daemon")
GRACE_SECONDS = 5.0  # with the paid-call drain (2 s) and the webhook flush (1 s), a stop stays under 10 s
HEARTBEAT_SECONDS = 5.0
REFRESH_SECONDS = 60.0  # the heartbeat counts the queue and writes folder health at least this often
PRUNE_EVERY = 86400.0


class _Changes(Subscriber):
    """Counts what changes the queue here (files settled, jobs run), so the heartbeat counts it only then."""

    def __init__(self) -> None:
        self.count = 0

    def file_settled(self, folder: str, path: str) -> None:
        self.count += 1

    def outcome(self, outcome: Outcome) -> None:
        self.count += 1


class Daemon(Steering):
    """`watcher run`: watch the configured folders until a signal says stop; SIGHUP reloads the settings."""

    def __init__(
        self,
        settings: Settings,
        *,
        handle_signals: bool = True,
        reload: Callable[[], Settings] | None = None,
        notifier: Notifier | None = None,
        heartbeat: float = HEARTBEAT_SECONDS,
    ) -> None:
        if not settings.folders:
            raise ConfigError("no folder to watch: give one (`watcher run FOLDER`) or add [[folders]] to the config")
        self.settings = settings
        self.handle_signals = handle_signals
        self._reload = reload
        self.notifier: Notifier = notifier or NullNotifier()
        self.heartbeat = heartbeat
        self.stop = asyncio.Event()
        self._force = asyncio.Event()
        self._signals = 0
        self._reload_requested = False
        self.app: App | None = None
        self.metrics: NullMetrics = NullMetrics()
        self.metrics_address: tuple[str, int] | None = None
        self.web: Any = None  # watcher.web.server.WebServer while the page runs
        self._page: Any = None  # the same, also when it could not start (its stop clears the state it left)
        self._live: Subscriber | None = None  # the page's event feed, kept across reloads
        self._next_prune = 0.0
        self._alive_at = time.monotonic()
        self.open_files = 0  # the open-files soft limit, once raised at start
        self.started_at = time.time()
        self._control: ControlServer | None = None
        self.held_services: dict[str, str] = {}  # service -> why it is paused (its key was refused at the check)
        self._key_check: asyncio.Task[None] | None = None
        self.backfill: dict[str, Any] = {}  # what the last start or reload queued for work the config added

    def _alive(self) -> None:
        """The loop got round to the heartbeat: ping the systemd watchdog, and remember when (for /healthz)."""
        self._alive_at = time.monotonic()
        self.notifier.watchdog()

    def healthy(self) -> bool:
        """Whether the heartbeat ran lately, as the systemd watchdog would judge it (the page's /healthz)."""
        interval = min(self.heartbeat, self.notifier.watchdog_interval or self.heartbeat)
        return time.monotonic() - self._alive_at <= 3 * interval

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.request_reload()
        else:
            self.request_stop(signal.Signals(signum).name)

    def request_stop(self, reason: str, *, force: bool = False) -> None:
        """First call: stop claiming work and let in-flight jobs finish (grace); second or ``force``: now."""
        self._signals += 1
        self._reload_requested = False
        if self._signals == 1 and not force:
            log.info("daemon.stopping", reason=reason, next=f"finishing in-flight work for up to {GRACE_SECONDS:.0f} s")
            self.notifier.stopping()
            self.notifier.extend_timeout(GRACE_SECONDS + 4)
        else:
            log.warning("daemon.stopping_now", reason=reason, next="checkpointing in-flight work now")
            self._force.set()
        self.stop.set()

    def request_reload(self) -> None:
        """Reload the settings: checkpoint, rebuild everything from the new settings, carry on from the store."""
        if self._signals or self._reload is None:
            return
        log.info("daemon.reloading", next="checkpointing in-flight work, then starting again with the new settings")
        self._reload_requested = True
        self.notifier.reloading()
        self.stop.set()

    async def run(self) -> int:
        lock = StateLock(self.settings.state_dir)
        lock.acquire()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if self.handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        lag: LoopLag | None = None
        # systemd's default soft limit (1024) is low for folders, files and the page's connections at once
        self.open_files = raise_open_files_limit()
        self.started_at = time.time()
        try:
            control = self.settings.control
            self._control = ControlServer(
                socket_path(self.settings.state_dir), self._command, mode=control.mode, group=control.group
            )
            await self._control.start()
            await self._start_web()
            self._start_metrics()
            # How late the loop wakes (watcher_loop_lag_seconds): the watchdog's pings depend on it.
            lag = LoopLag(0.25, on_sample=self.metrics.loop_lag).start()
            while True:
                code = await self._serve()
                if not self._reload_requested:
                    return code
                self._reload_requested = False
                self.stop = asyncio.Event()
                self._force = asyncio.Event()
                self._apply_reload()
        finally:
            if lag is not None:
                await lag.stop()
            for sig in signals:
                loop.remove_signal_handler(sig)
            if self._page is not None:
                await self._page.stop()
            if self._control is not None:
                await self._control.stop()
            self.metrics.stop()
            self.notifier.close()
            lock.release()
            log.info("daemon.stopped")

    def _start_metrics(self) -> None:
        cfg = self.settings.metrics
        if not cfg.enabled:
            return
        metrics = Metrics(node=self.settings.store.node_name if self.settings.store.url else None)
        if self.web is not None and self.web.address is not None:
            self.web.ctx.metrics = metrics  # /metrics is served by the page's server (same token)
            self.metrics_address = self.web.address
        else:
            self.metrics_address = metrics.start_http(cfg.host, cfg.port)
        self.metrics = metrics
        log.info("metrics.serving", url=f"http://{self.metrics_address[0]}:{self.metrics_address[1]}/metrics")

    async def _start_web(self) -> None:
        """The page and JSON API in this loop (``[web] enabled``); a taken port leaves the daemon running."""
        if not self.settings.web.enabled:
            return
        from watcher.web.api import Context
        from watcher.web.live import LiveEvents
        from watcher.web.server import WebServer

        live = LiveEvents()
        web = WebServer(Context(self.settings, live, wake=self._wake, healthy=self.healthy))
        self._page = web
        if await web.start():  # if not, the state folder's web.json says why, for `watcher status`
            self.web, self._live = web, live

    def _apply_reload(self) -> None:
        assert self._reload is not None
        try:
            new = self._reload()
            if new.state_dir != self.settings.state_dir:
                raise ConfigError("state_dir cannot change on reload; restart watcher to move the store")
            if not new.folders:
                raise ConfigError("the new configuration has no folder to watch")
        except ConfigError as exc:
            log.error("daemon.reload_failed", error=str(exc), next="carrying on with the previous settings")
            return
        self.settings = new
        if self.web is not None:
            self.web.ctx.settings = new
        log.info("daemon.reloaded", folders=[str(f.path) for f in new.folders])

    async def _serve(self) -> int:
        """One life of the object graph: build, start, run until stop (or reload), checkpoint."""
        webhooks = self._webhook_sender()
        changes = _Changes()
        subscribers: list[Subscriber] = [MetricsEvents(self.metrics), changes]
        if webhooks is not None:
            subscribers.append(WebhookEvents(webhooks, self.settings.webhooks.events))
        if self._live is not None:
            subscribers.append(self._live)
        app = App.build(self.settings, subscribers=subscribers, observer=self.metrics.request)
        self.app = app
        check_keys = self._check_keys(app)
        for service, current in app.rates().items():
            self.metrics.watch_rate(service, current)
        try:
            # Markers and the leftovers sweep both touch the share (slow ones take seconds): side by side.
            folders, _ = await self._fed(asyncio.gather(self._owned_folders(app), self._recover(app)))
            await self._fed(self._backfill())
            seen = {
                str(f["folder"])
                for f in await asyncio.to_thread(app.store.folder_states)
                if f["mode"] in ("native", "polling", "gone")
            }
            detector = app.make_detector(folders, seen=seen)
            # What start-up built (modules, settings, this graph) lives as long as this graph: kept out of the
            # collector's passes until it ends, so the first full pass over it does not land in the first scan
            # (where it cost about what 10,000 files' stat do), nor does any later one walk it again.
            gc.freeze()
            log.info(
                "daemon.started",
                version=__version__,
                folders=[str(f.path) for f in self.settings.folders],
                state_dir=str(self.settings.state_dir),
                open_files=self.open_files,
            )

            def ready() -> None:
                log.info("daemon.ready")
                self.notifier.ready()
                # Now, not before: the check loads the HTTP stack, which READY does not wait for. Until it
                # answers, the paid services' work stays unclaimed.
                self._key_check = asyncio.create_task(check_keys(), name="key-check")

            runner_task = asyncio.create_task(app.runner.run(self.stop), name="runner")
            detector_task = asyncio.create_task(detector.run(self.stop, on_first_scan=ready), name="detector")
            beat_task = asyncio.create_task(self._beat(app, changes), name="heartbeat")
            stop_wait = asyncio.create_task(self.stop.wait())
            done, _ = await asyncio.wait(
                {runner_task, detector_task, beat_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED
            )
            failed = [t for t in done if t is not stop_wait and not t.cancelled() and t.exception() is not None]
            for task in failed:
                log.error(
                    "daemon.component_failed",
                    component=task.get_name(),
                    error=repr(task.exception()),
                    next="stopping with exit 1 so the supervisor restarts watcher",
                )
                self.stop.set()
                self._reload_requested = False
            await self._shutdown(runner_task, detector_task, beat_task)
            return 1 if failed else 0
        finally:
            if self._key_check is not None:
                self._key_check.cancel()
                with contextlib.suppress(BaseException):
                    await self._key_check
                self._key_check = None
            if webhooks is not None:
                await webhooks.aclose(deadline=1.0)
            await app.aclose()
            self.app = None
            gc.unfreeze()  # the graph's cycles can be collected again (after a reload, the old graph's)
            gc.collect()  # now: else the next graph's freeze would keep this one's cycles for its whole life

    async def _fed(self, work: Awaitable[T]) -> T:
        """Await start-up ``work`` (slow on a slow share) while feeding the systemd watchdog."""
        task = asyncio.ensure_future(work)
        interval = min(self.heartbeat, self.notifier.watchdog_interval or self.heartbeat)
        while not (await asyncio.wait({task}, timeout=interval))[0]:
            self._alive()
        return task.result()

    async def _owned_folders(self, app: App) -> list[FolderConfig]:
        """The folders whose marker names our store (unmarked ones are marked ours); the others are left alone.
        The markers are read and written in a worker thread (a share may take seconds per call)."""
        folders, foreign = [], []
        claimed = await asyncio.to_thread(app.claim_folders)
        for owned, folder in zip(claimed, self.settings.folders, strict=True):
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
            app.store.set_folder_health(owned.folder, mode=None, reason=owned.reason, available=False)
        if not folders:
            raise ConfigError(
                f"nothing to watch: {'; '.join(foreign)} (its .watcher-folder marker names it); point [store] "
                "at that store, or take the folder over deliberately with `watcher adopt FOLDER` (see `watcher doctor`)"
            )
        return folders

    async def _recover(self, app: App) -> None:
        """Under the state folder's lock no earlier life can still be working: take back what it held, and
        remove the temp files a kill left behind (half-written sidecars, downloads, staging folders).
        A shared store (several nodes) gives back only what this node's earlier lives held (by its node ID), and
        refuses a start under a name another live node answers to (ConfigError)."""
        use_node(app.node_id)
        release_node = getattr(app.store, "release_node", None)  # a shared store (several nodes)
        claim_name = getattr(app.store, "claim_node_name", None)
        if release_node is not None and claim_name is not None:
            await asyncio.to_thread(claim_name, self.settings.store.node_name, app.node_id)
            released, doubtful = release_node(app.node_id, app.runner.owner)
        else:
            released, doubtful = app.store.release_leases(), app.store.gate_recover()
        if released:
            log.info("daemon.resumed", jobs=released, next="resuming work interrupted by the last stop")
        if doubtful:
            log.warning(
                "daemon.requests_in_doubt",
                operations=doubtful,
                next="paid requests cut off by the last stop: processing ones are held (`watcher status`), "
                "analysis ones are asked again",
            )
        self._prune(app)
        alive = getattr(app.store, "node_alive", lambda node: None)  # a shared store knows the other nodes
        removed = await asyncio.to_thread(sweep_temp, self._our_folders(), mine=app.node_id, alive=alive)
        if removed:
            log.info("daemon.leftovers_removed", files=len(removed), example=display(removed[0]))

    def _our_folders(self) -> list[tuple[Path, bool]]:
        """Every folder watcher writes into, with whether its subfolders count too."""
        s = self.settings
        roots = {f.path: f.recursive for f in s.folders}
        for extra in (s.archive.output_dir, s.sidecar.directory, *(f.output_dir for f in s.folders)):
            if extra is not None:
                roots[extra] = True
        for f in s.folders:
            for moved in (f.done_dir, f.failed_dir):
                if moved is not None:
                    roots[moved] = True
        return list(roots.items())

    def _webhook_sender(self) -> WebhookSender | None:
        cfg = self.settings.webhooks
        if not cfg.urls:
            return None
        sender = WebhookSender(cfg.urls, secret=reveal(cfg.secret), timeout=cfg.timeout, observer=self.metrics.request)
        sender.start()
        return sender

    def _prune(self, app: App) -> None:
        """Forget old replaced and deleted versions (results and paid IDs stay); once at start, then daily."""
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY
        forgotten = app.store.prune(self.settings.store.retention_days)
        if forgotten:
            log.info("store.pruned", versions=forgotten, older_than_days=self.settings.store.retention_days)

    async def _beat(self, app: App, changes: _Changes) -> None:
        """Every few seconds: watchdog ping, a status line for the supervisor, folder health into the store.

        Idle costs next to nothing: the queue is counted again only after a file settled or a job ran here (or
        once every ``REFRESH_SECONDS``, for what other nodes and commands changed), and a folder's health is
        written only when it changed (or as often, so `watcher status` sees it is current).
        """
        interval = min(self.heartbeat, self.notifier.watchdog_interval or self.heartbeat)
        seen, refreshed = -1, 0.0
        health: dict[str, tuple[object, ...]] = {}
        while not self.stop.is_set():
            self._alive()
            now = time.monotonic()
            stale = now - refreshed >= REFRESH_SECONDS
            if changes.count != seen or stale:
                seen = changes.count
                # through an index: finished jobs are not read; a pipeline with nothing open shows 0
                counts: dict[str, dict[str, int]] = {name: {} for name in app.runner.pipelines}
                counts |= app.store.open_counts()
                self.metrics.queue(counts, TERMINAL)
                if self.metrics.wants_backlog:  # a few index reads, for the gauges only
                    self.metrics.backlog(backlog(app.store, caps_of(self.settings)))
                waiting = sum(n for stages in counts.values() for s, n in stages.items() if s not in TERMINAL)
                failed = sum(stages.get("failed", 0) for stages in counts.values())
                held = "".join(f"; {service} paused" for service in sorted(self.held_services))
                self.notifier.status(f"{waiting} queued, {app.runner.busy} in progress, {failed} failed{held}")
            self._prune(app)
            beat = getattr(app.store, "heartbeat", None)
            if beat is not None:  # a shared store: this node is alive (`watcher status` lists nodes)
                beat(self.settings.store.node_name, owner=app.runner.owner, version=__version__,
                     folders=[str(f) for f in app.folders])  # fmt: skip
            if app.detector is not None:
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
                    app.store.set_folder_health(
                        folder,
                        mode=None if mode is None else str(mode),
                        reason=None if reason is None else str(reason),
                        available=bool(f["available"]),
                    )
            if stale:
                refreshed = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), interval)

    async def _shutdown(self, runner_task: asyncio.Task[None], *others: asyncio.Task[None]) -> None:
        started = time.monotonic()
        force = asyncio.create_task(self._force.wait())
        await asyncio.wait({runner_task, force}, timeout=GRACE_SECONDS, return_when=asyncio.FIRST_COMPLETED)
        force.cancel()
        for task in (runner_task, *others):
            if not task.done():
                task.cancel()
        results = await asyncio.gather(runner_task, *others, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                log.error("daemon.shutdown_error", error=repr(r))
        log.info("daemon.checkpointed", seconds=round(time.monotonic() - started, 2))
