"""The daemon's lifecycle, and nothing else: the state folder's lock, signals, reload, shutdown.

Start-up: lock the state folder, build the object graph (watcher.app.build_daemon); its housekeeping
(watcher.housekeeping) gives back leases and recovers paid requests cut off by the last stop, and pings the
watchdog from start to end. Main loop: detector, runner and housekeeping's chores side by side. Shutdown: the first
SIGTERM/SIGINT stops claiming work and lets running jobs finish for a grace period, then checkpoints them;
a second signal checkpoints at once. SIGHUP rebuilds the graph from re-read settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import signal
import time
from collections.abc import Callable
from typing import Any

import structlog

from watcher import __version__
from watcher.app import App, build_daemon, open_store
from watcher.config import Settings
from watcher.control import ControlServer, socket_path
from watcher.errors import ConfigError
from watcher.events import Subscriber
from watcher.fsutil import raise_open_files_limit
from watcher.housekeeping import Housekeeping
from watcher.looplag import LoopLag
from watcher.metrics import Metrics, NullMetrics
from watcher.pace import caps_of
from watcher.sdnotify import Notifier, NullNotifier
from watcher.statelock import DAEMON, StateLock
from watcher.steering import Steering
from watcher.store.outage_aio import wait_for_store

log = structlog.get_logger("watcher.daemon")
GRACE_SECONDS = 5.0  # with the paid-call drain (2 s) and the webhook flush (1 s), a stop stays under 10 s
RELOAD_GRACE_SECONDS = 60.0  # a reload has no deadline of its own: running transfers may end instead of being cut
CHECKPOINT_SECONDS = 0.5  # after the grace, how long cancelled jobs may take to checkpoint before the store closes
HEARTBEAT_SECONDS = 5.0
# A start waits this long for the state folder's lock: a command (`watcher status`, `scan`) may hold it a moment.
LOCK_WAIT_SECONDS = 10.0


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
        self.housekeeping = Housekeeping(
            self.notifier, heartbeat=heartbeat, held=lambda: self.held_services, caps=lambda: caps_of(self.settings)
        )
        self.stop = asyncio.Event()
        self._force = asyncio.Event()
        self._signals = 0
        self._reload_requested = False
        self._new_settings: Settings | None = None  # read and checked when the reload was asked for
        self._late: set[asyncio.Task[None]] = set()  # tasks still checkpointing when the store closed
        self.app: App | None = None
        self.metrics: NullMetrics = NullMetrics()
        self.metrics_address: tuple[str, int] | None = None
        self.web: Any = None  # watcher.web.server.WebServer while the page runs
        self._page: Any = None  # the same, also when it could not start (its stop clears the state it left)
        self._store_open = asyncio.Event()  # set once the first graph has opened the store: page reads wait for it
        self._live: Subscriber | None = None  # the page's event feed, kept across reloads
        self.open_files = 0  # the open-files soft limit, once raised at start
        self.started_at = time.time()
        self._control: ControlServer | None = None
        self.held_services: dict[str, str] = {}  # service -> why it is paused (its key was refused at the check)
        self._key_check: asyncio.Task[None] | None = None
        self.backfill: dict[str, Any] = {}  # what the last start or reload queued for work the config added

    def healthy(self) -> bool:
        """Whether the pulse ran lately, as the systemd watchdog would judge it (the page's /healthz)."""
        return self.housekeeping.healthy()

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.request_reload()
        else:
            self.request_stop(signal.Signals(signum).name)

    def request_stop(self, reason: str, *, force: bool = False) -> None:
        """First call: stop claiming work and let running jobs finish (grace); second or ``force``: now."""
        self._signals += 1
        if self._reload_requested:  # a stop during a reload's wait: no reload, and no long wait either
            self._reload_requested, force = False, True
        if self._signals == 1 and not force:
            log.info("daemon.stopping", reason=reason, next=f"finishing running jobs for up to {GRACE_SECONDS:.0f} s")
            self.notifier.stopping()
            self.notifier.extend_timeout(GRACE_SECONDS + 4)
        else:
            log.warning("daemon.stopping_now", reason=reason, next="checkpointing running jobs now")
            self.notifier.stopping()
            self._force.set()
        self.stop.set()

    def request_reload(self) -> None:
        """Reload the settings: read and check them first (a broken config changes nothing, and no work is cut);
        then stop claiming, let running jobs finish (up to ``RELOAD_GRACE_SECONDS``: a request cut here may be
        paid again), rebuild everything from the new settings and carry on from the store."""
        if self._signals or self._reload is None or self._reload_requested:
            return
        new = self._read_new_settings()
        if new is None:
            return
        self._new_settings = new
        if self.app is not None:
            self.app.retime(new.bwlimit)
        log.info(
            "daemon.reloading",
            next=f"letting running jobs finish for up to {RELOAD_GRACE_SECONDS:.0f} s, then starting again with the "
            "new settings (a stop now checkpoints at once)",
        )
        self._reload_requested = True
        self.notifier.reloading()
        self.stop.set()

    def _read_new_settings(self) -> Settings | None:
        """The configuration as it is now on disk, or None (logged) when it cannot replace the running one."""
        assert self._reload is not None
        try:
            new = self._reload()
            if new.state_dir != self.settings.state_dir:
                raise ConfigError("state_dir cannot change on reload; restart watcher to move the store")
            if not new.folders:
                raise ConfigError("the new configuration has no folder to watch")
        except ConfigError as exc:
            log.error("daemon.reload_failed", error=str(exc), next="carrying on with the previous settings; no work "
                      "was interrupted")  # fmt: skip
            return None
        return new

    async def run(self) -> int:
        lock = StateLock(self.settings.state_dir, role=DAEMON)
        await asyncio.to_thread(lock.acquire, wait=LOCK_WAIT_SECONDS)
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if self.handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        lag: LoopLag | None = None
        ended = asyncio.Event()
        pulse = asyncio.create_task(self.housekeeping.pulse(ended), name="pulse")  # from start to end, every life
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
            ended.set()
            await pulse
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
        self.metrics = self.housekeeping.metrics = metrics
        log.info("metrics.serving", url=f"http://{self.metrics_address[0]}:{self.metrics_address[1]}/metrics")

    async def _start_web(self) -> None:
        """The page and JSON API in this loop (``[web] enabled``); a taken port leaves the daemon running."""
        if not self.settings.web.enabled:
            return
        from watcher.web.api import Context
        from watcher.web.live import LiveEvents
        from watcher.web.server import WebServer

        live = LiveEvents()
        ctx = Context(self.settings, live, wake=self._wake, healthy=self.healthy, store_open=self._store_open)
        web = WebServer(ctx)
        self._page = web
        if await web.start():  # if not, the state folder's web.json says why, for `watcher status`
            self.web, self._live = web, live

    def _apply_reload(self) -> None:
        new, self._new_settings = self._new_settings, None
        if new is None:
            return
        self.settings = new
        if self.web is not None:
            self.web.ctx.settings = new
        log.info("daemon.reloaded", folders=[str(f.path) for f in new.folders])

    async def _serve(self) -> int:
        """One life of the object graph: build, start, run until stop (or reload), checkpoint. A store that cannot
        be reached is waited for (the daemon runs on, saying so), never a reason to exit."""
        if not await wait_for_store(
            functools.partial(_open_and_close, self.settings), self.settings.state_dir, self.stop
        ):
            return 0
        app = await build_daemon(self.settings, metrics=self.metrics, housekeeping=self.housekeeping, live=self._live)
        self.app = app
        self._store_open.set()
        check_keys = self._check_keys(app)
        try:
            # Markers and the leftovers sweep both touch the share (slow ones take seconds): side by side.
            folders, _ = await asyncio.gather(self.housekeeping.owned_folders(app), self.housekeeping.recover(app))
            await self._backfill()
            seen = {
                str(f["folder"]) for f in await app.aio.folder_states() if f["mode"] in ("native", "polling", "gone")
            }
            detector = app.make_detector(folders, seen=seen, sweep=self.housekeeping.leftovers)
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

            tasks = [
                asyncio.create_task(app.runner.run(self.stop), name="runner"),
                asyncio.create_task(detector.run(self.stop, on_first_scan=ready), name="detector"),
                asyncio.create_task(self.housekeeping.chores(app, self.stop), name="heartbeat"),
            ]
            return await self._until_stop(tasks)
        finally:
            await self._close(app)

    async def _close(self, app: App) -> None:
        """The end of one life of the graph: the key check, the graph's clients and store, the late checkpoints."""
        if self._key_check is not None:
            self._key_check.cancel()
            with contextlib.suppress(BaseException):
                await self._key_check
            self._key_check = None
        if self._control is not None:
            self._control.cut()  # commands on this graph end now, saying so, rather than hang or fail on it
        await app.aclose()
        if self._late:  # their store calls ended with the store: they end now
            await asyncio.wait(self._late, timeout=CHECKPOINT_SECONDS)
            for task in self._late:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.warning("daemon.checkpoint_lost", task=task.get_name(), error=repr(task.exception()),
                                next="its leases run out; the next life takes the work up")  # fmt: skip
            self._late = set()
        self.app = None
        gc.unfreeze()  # the graph's cycles can be collected again (after a reload, the old graph's)
        gc.collect()  # now: else the next graph's freeze would keep this one's cycles for its whole life

    async def _until_stop(self, tasks: list[asyncio.Task[None]]) -> int:
        """Run the runner (first), the detector and the chores until a stop or one fails (exit 1), then checkpoint."""
        stop_wait = asyncio.create_task(self.stop.wait())
        done, _ = await asyncio.wait({*tasks, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
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
        await self._shutdown(*tasks)
        return 1 if failed else 0

    async def _shutdown(self, runner_task: asyncio.Task[None], *others: asyncio.Task[None]) -> None:
        """Let running jobs finish (the grace: longer for a reload), then cancel them to checkpoint. A checkpoint
        that cannot reach the store (an outage) is not waited for past ``CHECKPOINT_SECONDS``: closing the store
        ends its call, and its leases run out on their own (the paid answers are in the journal)."""
        started = time.monotonic()
        grace = RELOAD_GRACE_SECONDS if self._reload_requested else GRACE_SECONDS
        force = asyncio.create_task(self._force.wait())
        await asyncio.wait({runner_task, force}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        force.cancel()
        tasks = (runner_task, *others)
        for task in tasks:
            if not task.done():
                task.cancel()
        _, late = await asyncio.wait(tasks, timeout=CHECKPOINT_SECONDS)
        if late:
            log.warning("daemon.checkpoint_slow", tasks=sorted(t.get_name() for t in late),
                        next="closing the store under them; their leases run out on their own")  # fmt: skip
            self._late = late
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("daemon.shutdown_error", error=repr(task.exception()))
        log.info("daemon.checkpointed", seconds=round(time.monotonic() - started, 2))


def _open_and_close(settings: Settings) -> None:
    """Open the store the settings name (connecting, migrating) and close it: whether it can be used now."""
    open_store(settings).close()
