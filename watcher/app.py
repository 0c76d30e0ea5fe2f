"""The composition root: frozen settings in, the finished object graph out. Nothing else wires objects.

    Settings ─▶ App.build ─┬─ store (SQLite, or PostgreSQL for several machines, behind the ports)
                           ├─ backend for analysis (remote client, or the local Essentia pool)
                           ├─ processing client (archive) ── deliverer
                           ├─ pipelines: analyze, archive (each a Pipeline of steps)
                           ├─ runner (the one scheduler) ── mover (done/failed folders)
                           ├─ sink (detection's way into the store) ── detector (made on demand)
                           └─ events: the subscribers given (metrics, webhooks), told of every outcome

`watcher run` (the daemon) and the short commands (`scan`, `retry`, `status`, ...) all start from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from watcher import markers
from watcher.audiofile import Signature
from watcher.config import FolderConfig, Settings, reveal, service_identity
from watcher.detect.detector import Detector, Settled
from watcher.errors import ConfigError
from watcher.events import Events, MetricsEvents, Subscriber, WebhookEvents
from watcher.fsutil import node_id
from watcher.metrics import NullMetrics
from watcher.names import display
from watcher.pipelines.base import Pipeline
from watcher.pipelines.mover import SourceMover
from watcher.runner import LEASE, Outcome, Runner
from watcher.services.http import RequestObserver
from watcher.store import TERMINAL, FileRevision, Job, NewRevision, Store
from watcher.store.aio import AsyncStore, Guard, unguarded
from watcher.store.away import StoreAway
from watcher.store.models import Signatures
from watcher.store.outage_aio import OutageStore, outage_store
from watcher.store.ports import StorePort

if TYPE_CHECKING:
    from watcher.services.bandwidth import Bandwidth
    from watcher.webhooks import WebhookSender

log = structlog.get_logger("watcher.app")
PAID_DRAIN_SECONDS = 2.0
PG_THREADS = 4  # PostgreSQL calls under way at once (each on a pooled connection of its own)


def store_path(settings: Settings) -> Path:
    """Where the SQLite store lives."""
    return settings.state_dir / "watcher.db"


def open_store(settings: Settings, *, readonly: bool = False) -> StorePort:
    """The adapter the settings name: PostgreSQL (``[store] url``, shared by several machines) or SQLite."""
    if not settings.store.url:
        return Store(store_path(settings), readonly=readonly)
    from watcher.store.postgres import PostgresStore

    passfile = str(settings.store.passfile) if settings.store.passfile else None
    store = PostgresStore(
        settings.store.url,
        passfile=passfile,
        readonly=readonly,
        lease=settings.store.lease_seconds,
        name=f"watcher {settings.store.node_name}",
        pool_size=PG_THREADS,
    )
    store.use_folders(
        {str(f.path): o.folder_id for f in settings.folders if (o := markers.inspect(f.path, store.store_id)).ours}
    )
    return store


class StoreSink:
    """Detection's sink: a settled file becomes a revision with one job per enabled pipeline."""

    def __init__(
        self, store: AsyncStore, pipelines: Iterable[Pipeline], wake: Callable[[], None], events: Events
    ) -> None:
        """``known`` and ``recorded`` are asked from the detector's threads (the store's ``sync`` side); settled
        files are recorded from the loop, through the store's own threads."""
        self.store = store
        self.jobs = [(p.name, p.first_step) for p in pipelines]
        self.wake = wake
        self.events = events

    def known(self, path: str, sig: Signature) -> bool:
        return self.store.sync.known_revision(path, sig.size, sig.mtime_ns, sig.inode)

    def recorded(self, folder: str) -> Signatures:
        return self.store.sync.current_signatures(folder)

    async def ready(
        self, folder: FolderConfig, path: str, rel_path: str, sig: Signature, *, live: bool = False
    ) -> None:
        _, new = await self.store.register_revision(
            folder=str(folder.path),
            path=path,
            rel_path=rel_path,
            size=sig.size,
            mtime_ns=sig.mtime_ns,
            inode=sig.inode,
            jobs=self.jobs,
            live=live,
            priority=folder.priority,
        )
        if new:
            self._settled(str(folder.path), path, sig)
            self.wake()

    async def ready_many(self, files: Sequence[Settled]) -> None:
        """Files settled together: registered in one store transaction, then the workers are woken once."""
        revisions = []
        for f in files:
            sig = f.signature
            revisions.append(
                NewRevision(
                    str(f.folder.path), f.path, f.rel_path, sig.size, sig.mtime_ns, sig.inode, f.live, f.folder.priority
                )
            )
        answers = await self.store.register_revisions(revisions, jobs=self.jobs)
        new = [f for f, (_, is_new) in zip(files, answers, strict=True) if is_new]
        for f in new:
            self._settled(str(f.folder.path), f.path, f.signature)
        if new:
            self.wake()

    def _settled(self, folder: str, path: str, sig: Signature) -> None:
        queued = ", ".join(name for name, _ in self.jobs)
        log.info("file.settled", path=display(path), size=sig.size, next=f"queued for {queued}")
        self.events.file_settled(folder, path)


class App:
    """Everything that does work, built from settings by :meth:`build`; closed with :meth:`aclose`."""

    def __init__(
        self,
        settings: Settings,
        folders: Sequence[FolderConfig],
        aio: AsyncStore,
        pipelines: Sequence[Pipeline],
        events: Events,
        closers: list[Any],
        bandwidth: Bandwidth | None = None,
    ) -> None:
        self.settings = settings
        self.bandwidth = bandwidth  # the limit every client of the graph shares (None: none)
        self.folders = {str(f.path): f for f in folders}
        self.aio = aio  # the store for code on the event loop: every call in the store's own threads
        self.store = aio.sync  # the same store, for code already off the loop (commands, worker threads)
        self.pipelines = {p.name: p for p in pipelines}
        self.events = events
        self.closers = closers
        self.node_id = node_id(settings.state_dir)  # this machine, whatever its name (leases carry it)
        self.webhooks: WebhookSender | None = None  # the daemon's, closed with the graph
        self.mover = SourceMover(self.store, self.folders, settings.sidecar)  # it asks from a worker thread
        self.runner = Runner(
            aio,
            self.pipelines,
            concurrency=_concurrency(settings, self.pipelines),
            retry=settings.retry,
            on_outcome=self._outcome,
            rehint=self._rehint,
            holder=f"{settings.store.node_name}:{os.getpid()}:{time.time():.0f}@{self.node_id}",
            lease=settings.store.lease_seconds if settings.store.url else LEASE,
        )
        self.sink = StoreSink(aio, pipelines, self.runner.wake, events)
        self.detector: Detector | None = None

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        folders: Sequence[FolderConfig] | None = None,
        subscribers: Iterable[Subscriber] = (),
        observer: RequestObserver | None = None,
        guard: Guard = unguarded,
    ) -> App:
        """The whole graph for ``settings`` (``folders``: a subset or override, for `scan`); ``observer`` is told
        of every HTTP request any client makes (metrics); ``guard`` sees every store call made from the loop."""
        store = open_store(settings)  # the daemon's use of it survives an outage (watcher.store.outage)
        shared = bool(settings.store.url)
        aio = outage_store(store, settings.state_dir, shared=shared, threads=PG_THREADS if shared else 1, guard=guard)
        events = Events(subscribers)
        closers: list[Any] = []
        bandwidth = _bandwidth(settings)
        try:
            pipelines: list[Pipeline] = []
            if settings.analysis.enabled:
                pipelines.append(_analyze(settings, aio, events, closers, observer, bandwidth))
            if settings.archive.enabled:
                chosen = folders if folders is not None else settings.folders
                chosen_folders = {str(f.path): f for f in chosen}
                pipelines.append(_archive(settings, aio, events, closers, chosen_folders, observer, bandwidth))
            if not pipelines:
                raise ConfigError("nothing to do: both analysis.enabled and archive.enabled are false")
        except BaseException:
            store.close()
            raise
        chosen = folders if folders is not None else settings.folders
        return cls(settings, chosen, aio, pipelines, events, closers, bandwidth)

    def retime(self, bwlimit: str) -> None:
        """A reload's new ``bwlimit`` for the transfers under way (before the graph is rebuilt with it): the shared
        limit takes the new timetable at once, so a limit lifted speeds them up instead of holding the reload.
        Transfers that started without any limit stay without."""
        from watcher.config.bwlimit import parse_bwlimit

        if self.bandwidth is not None:
            self.bandwidth.table = parse_bwlimit(bwlimit)
            log.info("bandwidth.retimed", bwlimit=str(self.bandwidth.table), next="transfers under way follow it now")

    def rates(self) -> dict[str, Callable[[], float]]:
        """The current adaptive rate of each service session the graph holds, by service name (for metrics)."""
        from watcher.services.http import ServiceHTTP

        out: dict[str, Callable[[], float]] = {}
        for closer in self.closers:
            for holder in (closer, getattr(closer, "client", None), getattr(closer, "storage", None)):
                http = getattr(holder, "http", None)
                if isinstance(http, ServiceHTTP):
                    out[http.service] = http.pace.current
        return out

    def claim_folders(self) -> list[markers.Ownership]:
        """Mark unmarked folders as this store's and read who owns each; a shared store then claims only in ours."""
        node = self.settings.store.node_name
        mine = markers.store_id(self.store, self.settings.state_dir)
        owned = [markers.claim(Path(path), mine, node) for path in self.folders]
        self.store.use_folders({o.folder: o.folder_id for o in owned if o.ours})
        return owned

    def make_detector(self, folders: Sequence[FolderConfig], **kwargs: Any) -> Detector:
        excluded = {str(f.path): self.settings.own_dirs(f) for f in folders}
        self.detector = Detector(folders, self.sink, excluded_dirs=excluded, **kwargs)
        return self.detector

    def _rehint(self, path: str) -> None:
        if self.detector is not None:
            self.detector.hint(path)

    def _outcome(self, outcome: Outcome) -> None:
        if outcome.state in TERMINAL:
            self.mover.schedule(outcome.job)
        self.events.outcome(outcome)

    def store_away(self) -> StoreAway | None:
        """Why a command cannot use the store now, when this graph already knows it is away (None: ask it)."""
        return self.aio.known_away() if isinstance(self.aio, OutageStore) else None

    async def aclose(self) -> None:
        """Let paid calls in flight record their ending, finish moves, close clients and the store."""
        await self.mover.wait()
        for pipeline in self.pipelines.values():
            drain = getattr(pipeline, "drain", None)
            if drain is not None:
                await drain(PAID_DRAIN_SECONDS)
        for closer in self.closers:
            with contextlib.suppress(Exception):
                await closer.aclose()
        if self.webhooks is not None:
            await self.webhooks.aclose(deadline=1.0)
        await self.aio.aclose()


async def build_daemon(
    settings: Settings,
    *,
    metrics: NullMetrics,
    housekeeping: Subscriber,
    live: Subscriber | None,
    guard: Guard = unguarded,
) -> App:
    """The daemon's graph: :meth:`App.build`, with metrics, webhooks, the page's live feed (``live``) and the
    daemon's housekeeping told of everything, and every client's rate watched by the metrics; ``guard`` sees
    every store call made from the loop. The build (opening the store: a connection, a migration check) runs in a
    thread, so a database that stops answering just then does not stall the loop; what needs the loop starts here."""
    subscribers: list[Subscriber] = [MetricsEvents(metrics), housekeeping]
    if live is not None:
        subscribers.append(live)
    build = functools.partial(App.build, settings, subscribers=subscribers, observer=metrics.request, guard=guard)
    app = await asyncio.to_thread(build)
    if settings.webhooks.urls:
        from watcher.webhooks import WebhookSender

        cfg = settings.webhooks
        app.webhooks = WebhookSender(cfg.urls, secret=reveal(cfg.secret), timeout=cfg.timeout, observer=metrics.request)
        app.webhooks.start()
        app.events.subscribers.append(WebhookEvents(app.webhooks, cfg.events))
    for service, current in app.rates().items():
        metrics.watch_rate(service, current)
    return app


def _concurrency(settings: Settings, pipelines: dict[str, Pipeline]) -> dict[str, int]:
    out = {"archive": settings.archive.concurrency}
    analyze = pipelines.get("analyze")
    remote = getattr(analyze, "service", None) is not None
    out["analyze"] = settings.analysis.concurrency if remote else settings.analysis.local_workers
    return out


def _bandwidth(settings: Settings) -> Bandwidth | None:
    """The one bandwidth limit every client of the graph shares (``bwlimit``), or None when it is off."""
    from watcher.config.bwlimit import parse_bwlimit

    table = parse_bwlimit(settings.bwlimit)
    if table.is_off:
        return None
    from watcher.services.bandwidth import Bandwidth

    log.info("bandwidth.limit", bwlimit=str(table), next="every request and download of both services shares it")
    return Bandwidth(table)


def _analyze(
    settings: Settings,
    store: AsyncStore,
    events: Events,
    closers: list[Any],
    observer: RequestObserver | None,
    bandwidth: Bandwidth | None,
) -> Pipeline:
    from watcher.backends import choose_backend, make_backend
    from watcher.config.audio_url import without_query
    from watcher.pipelines.analyze import AnalyzePipeline, no_audio_url

    which, why = choose_backend(settings.analysis)
    log.info("analysis.backend", backend=which, reason=why, models=list(settings.analysis.models))
    backend = make_backend(settings.analysis, which, observer=observer, bandwidth=bandwidth)
    closers.append(backend)
    store.sync.adopt_legacy(backend.name, backend.key)
    templates = settings.audio_url_templates()
    if templates and not backend.paid:
        log.warning(
            "analysis.audio_url_ignored",
            backend=which,
            templates=[without_query(t) for t in templates],
            next="the local backend reads each file from disk; audio_url_template is used by the remote service only",
        )
    return AnalyzePipeline(
        store,
        backend,
        models=settings.analysis.models,
        sidecar=settings.sidecar,
        cap_minutes=settings.analysis.daily_audio_minutes,
        spend=events,
        audio_url=_audio_urls(settings) if templates and backend.paid else no_audio_url,
    )


def _audio_urls(settings: Settings) -> Callable[[FileRevision], str | None]:
    """Where the analysis service fetches each file, from its folder's ``audio_url_template``."""
    return lambda revision: settings.audio_url_for(revision.folder, revision.rel_path)


def _archive(
    settings: Settings,
    store: AsyncStore,
    events: Events,
    closers: list[Any],
    folders: dict[str, FolderConfig],
    observer: RequestObserver | None,
    bandwidth: Bandwidth | None,
) -> Pipeline:
    from watcher.pipelines.archive import ArchivePipeline
    from watcher.pipelines.deliver import Deliverer
    from watcher.services.http import HttpPolicy
    from watcher.services.neuralanalog import NeuralAnalogClient

    cfg = settings.archive
    policy = HttpPolicy(
        rate_per_second=cfg.rate_limit, concurrency=cfg.concurrency, read_timeout=cfg.timeout, bandwidth=bandwidth
    )
    processor = NeuralAnalogClient(cfg.base_url, reveal(cfg.api_key), policy=policy, observer=observer)
    closers.append(processor)

    def output_for(job: Job) -> Path | None:
        folder = folders.get(job.file.folder)
        return settings.output_dir_for(folder) if folder is not None else cfg.output_dir

    where = service_identity("processing", cfg.base_url, cfg.api_key)
    store.sync.adopt_legacy("neuralanalog", where)
    return ArchivePipeline(
        store, processor, cfg, Deliverer(processor, cfg, output_for), settings.sidecar, where=where, spend=events
    )
