"""The JSON API the page uses (scripts may too). Every action goes through :mod:`watcher.commands`, the
same functions as the CLI; every read starts from the status document."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from watcher import commands
from watcher.config import Settings
from watcher.errors import ConfigError
from watcher.names import display
from watcher.web import data
from watcher.web.live import LiveEvents


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

    async def report(self) -> dict[str, Any]:
        doc = await asyncio.to_thread(commands.status, self.settings)
        doc.update(self.status_extra)
        return doc

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


def problem(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


async def _body(request: Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


async def file_info(ctx: Context, path: str) -> dict[str, Any] | None:
    """Everything about one file: its sidecar (summary and curves), jobs with errors, delivery and manifest."""
    report = await ctx.report()
    entry = next((f for f in report["files"] if f["path"] == path), None)
    if entry is None:
        return None
    jobs = await asyncio.to_thread(commands.jobs_of, ctx.settings, path)
    analyze = entry["jobs"].get("analyze", {})
    archive = entry["jobs"].get("archive", {})
    doc = await asyncio.to_thread(data.sidecar, analyze.get("sidecar"))
    return {
        "path": path,
        "state": data.state_of(entry),
        "status": entry["jobs"],
        "jobs": jobs,
        "problems": [p for p in report["problems"] if p["path"] == path],
        "summary": data.summary(doc),
        "curves": data.curves(doc),
        "sidecar_path": analyze.get("sidecar"),
        "sidecar": doc,
        "delivery": await asyncio.to_thread(data.deliveries, archive.get("delivery")),
    }


def routes(ctx: Context) -> list[tuple[str, str, Callable[[Request], Any]]]:
    """(method, path, endpoint) for every API route."""
    api = _Api(ctx)
    return [
        ("GET", "/api/status", api.status),
        ("GET", "/api/files", api.files),
        ("GET", "/api/file", api.file),
        ("POST", "/api/retry", api.retry),
        ("POST", "/api/pause", api.pausing(True)),
        ("POST", "/api/resume", api.pausing(False)),
        ("GET", "/api/events", api.events),
    ]


class _Api:
    """The endpoints, over the same commands and status document as the CLI."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def status(self, request: Request) -> Response:
        return JSONResponse(await self.ctx.report())

    async def files(self, request: Request) -> Response:
        report = await self.ctx.report()
        listing = await asyncio.to_thread(lambda: data.select(data.rows(report), request.query_params))
        return JSONResponse(listing)

    async def file(self, request: Request) -> Response:
        path = request.query_params.get("path", "")
        if not path:
            return problem(422, "path: give the audio file's path (?path=...)")
        info = await file_info(self.ctx, path)
        if info is None:
            return problem(404, f"{display(path)} is not a file watcher knows (not yet settled, or deleted)")
        return JSONResponse(info)

    async def retry(self, request: Request) -> Response:
        body = await _body(request)
        if body is None:
            return problem(422, 'send JSON: {"paths": [...]}, {"failed": true} or {"in_doubt": true}')
        paths = body.get("paths") or []
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            return problem(422, "paths: a list of file or folder paths")
        try:
            n = await asyncio.to_thread(
                commands.retry,
                self.ctx.settings,
                [Path(p) for p in paths],
                failed=bool(body.get("failed")),
                in_doubt=bool(body.get("in_doubt")),
            )
        except ConfigError as exc:
            return problem(422, str(exc))
        self.ctx.wake()
        return JSONResponse({"retried": n})

    def pausing(self, paused: bool) -> Callable[[Request], Any]:
        """The endpoint that pauses (or resumes) one watched folder."""

        async def endpoint(request: Request) -> Response:
            body = await _body(request)
            folder = (body or {}).get("folder")
            if not isinstance(folder, str) or not folder:
                return problem(422, 'send JSON: {"folder": PATH}')
            if str(PurePath(folder)) not in self.ctx.folders():  # as configured: absolute, no trailing slash
                return problem(404, f"{display(folder)} is not a watched folder")
            recorded = await asyncio.to_thread(commands.pause, self.ctx.settings, Path(folder), paused=paused)
            self.ctx.wake()
            return JSONResponse({"folder": display(recorded), "paused": paused})

        return endpoint

    async def events(self, request: Request) -> Response:
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(self.ctx.live.stream(), media_type="text/event-stream", headers=headers)
