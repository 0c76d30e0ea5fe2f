"""The JSON API the page uses (scripts may too). Every action goes through :mod:`watcher.commands`, the
same functions as the CLI; every read goes through one long-lived read-only store connection, in pages and
indexed lookups (never the whole store per request)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from watcher import commands
from watcher.app import open_store
from watcher.config import Settings
from watcher.errors import ConfigError
from watcher.names import display, find_shown, is_text
from watcher.status import collect_for
from watcher.store import State
from watcher.store.away import read_outage, unavailable
from watcher.web import data
from watcher.web.live import LiveEvents

STORE_WAIT = 10.0  # seconds a page read waits for a starting daemon to open its store


@dataclass
class Context:
    """What the handlers need: the settings, a way to wake the runner, the live feed, whether the page
    runs in a daemon (``status_extra`` adds to the status document)."""

    settings: Settings
    live: LiveEvents
    wake: Callable[[], None] = lambda: None
    healthy: Callable[[], bool] = lambda: True
    metrics: Any = None
    status_extra: dict[str, Any] = field(default_factory=dict)
    # set by a daemon once its store is open (the page starts first): reads wait for it, up to STORE_WAIT seconds
    store_open: asyncio.Event | None = None
    _reader: Any = field(default=None, repr=False)
    _opening: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reader(self) -> Any:
        """The one read-only store connection every page and API read goes through, opened once (no migration
        check, no write lock per request); called off the event loop."""
        with self._opening:
            if self._reader is None:
                self._reader = open_store(self.settings, readonly=True)  # no migration check, no write lock
            return self._reader

    def close(self) -> None:
        with self._opening:
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    async def read(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(store)`` on the reader, in a thread (once the daemon's store is open, see :meth:`opened`)."""
        await self.opened()
        return await asyncio.to_thread(lambda: fn(self.reader()))

    async def opened(self) -> None:
        """Wait until the daemon has opened (created, migrated) its store: the page answers from the daemon's first
        second, and a read before that found a store not yet made. After STORE_WAIT seconds the read goes on (a
        store that cannot be reached is then said as such)."""
        if self.store_open is not None and not self.store_open.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.store_open.wait(), STORE_WAIT)

    async def report(self) -> dict[str, Any]:
        """The status document as the page shows it: counts, backlog, the first open files and problems; while the
        daemon cannot reach its store, what it says of that (since when, why, what next) and nothing else."""
        web = await asyncio.to_thread(commands.web_state, self.settings)
        await self.opened()
        outage = await asyncio.to_thread(read_outage, self.settings.state_dir)
        if outage is None:
            try:
                doc = await self.read(lambda store: collect_for(store, self.settings, web=web, brief=True))
            except Exception as exc:
                if not unavailable(exc):
                    raise
                error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                outage = {"unreachable_since": None, "error": error, "next": "the page asks again"}
        if outage is not None:
            doc = commands.unreachable_report(self.settings, outage, None)
        doc.update(self.status_extra)
        return dict(doc)

    async def store_away(self) -> dict[str, Any] | None:
        """What the daemon says of its store being unreachable (None: it is reachable)."""
        return await asyncio.to_thread(read_outage, self.settings.state_dir)

    def real_path(self, store: Any, shown: str) -> str | None:
        """The current file the page names ``shown`` (see :func:`watcher.names.display`): one indexed lookup,
        and for a name with undecodable bytes, its folder's listing on disk."""
        path = os.path.abspath(shown)
        if store.listed(path) is not None:
            return path
        real = find_shown(path)
        return real if real is not None and real != path and store.listed(real) is not None else None

    def folders(self) -> list[str]:
        return [str(f.path) for f in self.settings.folders]

    def audio_roots(self) -> list[str]:
        """Where audio may be served from: the watched folders and every output folder (real paths)."""
        s = self.settings
        roots = [f.path for f in s.folders] + [f.output_dir for f in s.folders if f.output_dir]
        roots += [f.done_dir for f in s.folders if f.done_dir]
        if s.archive.output_dir is not None:
            roots.append(s.archive.output_dir)
        return [os.path.realpath(r) for r in roots]


def shown(value: Any) -> Any:
    """``value`` with every string that is not valid text (a name's undecodable bytes) as
    :func:`watcher.names.display` shows it: the last net under the answers, whose paths are already shown."""
    if isinstance(value, str):
        return value if is_text(value) else display(value)
    if isinstance(value, dict):
        return {shown(k): shown(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [shown(v) for v in value]
    return value


class Answer(JSONResponse):
    """A JSON answer that any file name can be in."""

    def render(self, content: Any) -> bytes:
        return super().render(shown(content))


def problem(status: int, detail: str) -> JSONResponse:
    return Answer({"detail": detail}, status_code=status)


def path_param(value: str | None) -> str | None:
    """A path given in a query or body: None when absent, empty or not a possible path (a NUL byte)."""
    if not value or "\x00" in value:
        return None
    return value


async def _body(request: Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested deeper than the parser goes
        return None
    return body if isinstance(body, dict) else None


async def file_info(ctx: Context, path: str) -> dict[str, Any] | None:
    """Everything about one file, named as the page shows it: its sidecar (summary and curves), jobs with
    errors, delivery and manifest. Every path in it is shown through :func:`watcher.names.display`."""

    def look(store: Any) -> Any:
        real = ctx.real_path(store, path)
        return store.listed(real) if real is not None else None

    entry = await ctx.read(look)
    if entry is None:
        return None
    row = data.row_of(entry)
    jobs = [
        {
            "pipeline": j.pipeline,
            "step": j.step,
            "state": j.state,
            "attempts": j.attempts,
            "error": j.last_error,
            "error_code": j.error_code,
            "data": j.data,
        }
        for j in entry.jobs
    ]
    recorded = {j["pipeline"]: j["data"] for j in jobs}
    sidecar_path = recorded.get("analyze", {}).get("sidecar")
    doc = await asyncio.to_thread(data.sidecar, sidecar_path)
    delivery = await asyncio.to_thread(data.deliveries, recorded.get("archive", {}).get("delivery"))
    if delivery is not None:
        delivery = {
            **delivery,
            "folder": display(delivery["folder"]),
            "files": [{**f, "path": display(f["path"]), "absolute": display(f["absolute"])} for f in delivery["files"]],
        }
    problems = [
        {**_problem(j), "path": row["path"]}
        for j in entry.jobs
        if j.state in (State.FAILED, State.IN_DOUBT) or (j.last_error and j.state == State.PENDING)
    ]
    return {
        "path": path,
        "state": row["state"],
        "status": row["jobs"],
        "jobs": shown(jobs),
        "problems": problems,
        "summary": {k: row[k] for k in data.summary(None)} if doc is None else data.summary(doc),
        "curves": data.curves(doc),
        "sidecar_path": display(sidecar_path) if sidecar_path else None,
        "sidecar": shown(doc),
        "delivery": delivery,
    }


def _problem(job: Any) -> dict[str, Any]:
    """A job that needs attention, as `watcher status` lists problems."""
    return {
        "pipeline": job.pipeline,
        "step": job.step,
        "state": job.state,
        "error_code": job.error_code,
        "error": job.last_error,
        "attempts": job.attempts,
        "data": job.data,
    }


def routes(ctx: Context) -> list[tuple[str, str, Callable[[Request], Any]]]:
    """(method, path, endpoint) for every API route."""
    api = _Api(ctx)
    return [
        ("GET", "/api/status", api.status),
        ("GET", "/api/files", api.files),
        ("GET", "/api/file", api.file),
        ("POST", "/api/retry", api.retry),
        ("POST", "/api/pause", api.pausing(paused=True)),
        ("POST", "/api/resume", api.pausing(paused=False)),
        ("GET", "/api/events", api.events),
    ]


class _Api:
    """The endpoints, over the same commands and status document as the CLI."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def status(self, request: Request) -> Response:
        return Answer(await self.ctx.report())

    async def files(self, request: Request) -> Response:
        query = dict(request.query_params)
        away = await self.ctx.store_away()
        if away is not None:
            since = away.get("unreachable_since") or "now"
            return problem(503, f"the store is unreachable since {since} ({away.get('error')}): the list waits for it")
        return Answer(await self.ctx.read(lambda store: data.listing(store, query)))

    async def file(self, request: Request) -> Response:
        path = path_param(request.query_params.get("path"))
        if path is None:
            return problem(422, "path: give the audio file's path (?path=...)")
        info = await file_info(self.ctx, path)
        if info is None:
            return problem(404, f"{display(path)} is not a file watcher knows (not yet settled, or deleted)")
        return Answer(info)

    async def retry(self, request: Request) -> Response:
        body = await _body(request)
        if body is None:
            return problem(422, 'send JSON: {"paths": [...]}, {"failed": true} or {"in_doubt": true}')
        paths = body.get("paths") or []
        if not isinstance(paths, list) or not all(isinstance(p, str) and path_param(p) for p in paths):
            return problem(422, "paths: a list of file or folder paths")
        real = await self.ctx.read(lambda store: [self.ctx.real_path(store, p) or p for p in paths])
        try:
            n = await asyncio.to_thread(
                commands.retry,
                self.ctx.settings,
                [Path(p) for p in real],
                failed=bool(body.get("failed")),
                in_doubt=bool(body.get("in_doubt")),
            )
        except ConfigError as exc:
            return problem(422, str(exc))
        self.ctx.wake()
        return Answer({"retried": n})

    def pausing(self, *, paused: bool) -> Callable[[Request], Any]:
        """The endpoint that pauses (or resumes) one watched folder."""

        async def endpoint(request: Request) -> Response:
            body = await _body(request)
            folder = (body or {}).get("folder")
            if not isinstance(folder, str) or not path_param(folder):
                return problem(422, 'send JSON: {"folder": PATH}')
            if str(PurePath(folder)) not in self.ctx.folders():  # as configured: absolute, no trailing slash
                return problem(404, f"{display(folder)} is not a watched folder")
            recorded = await asyncio.to_thread(commands.pause, self.ctx.settings, Path(folder), paused=paused)
            self.ctx.wake()
            return Answer({"folder": display(recorded), "paused": paused})

        return endpoint

    async def events(self, request: Request) -> Response:
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(self.ctx.live.stream(), media_type="text/event-stream", headers=headers)
