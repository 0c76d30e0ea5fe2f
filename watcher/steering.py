"""What a running daemon does for the commands on its control socket, and before it pays anyone.

:class:`Steering` is the part of :class:`watcher.daemon.Daemon` that answers the control socket (through the
same functions in :mod:`watcher.commands` as the page), holds each paid service until its key passed a check
that bills nothing (and the archive until its output folder can be written), and queues the back-fill a start
or reload owes to files already there. The lifecycle itself (lock, signals, reload, heartbeat) stays in
:mod:`watcher.daemon`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import structlog

from watcher import commands
from watcher.app import App
from watcher.config import Settings
from watcher.control import Progress
from watcher.errors import ConfigError
from watcher.fsutil import cannot_write
from watcher.names import display

log = structlog.get_logger("watcher.daemon")


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Steering:
    """The daemon's answers to the control socket, its key and output checks, and its back-fill (a base of
    :class:`watcher.daemon.Daemon`, which sets these attributes)."""

    settings: Settings
    app: App | None
    web: Any
    _page: Any
    _signals: int
    started_at: float
    held_services: dict[str, str]  # service -> why it is held (its key was refused, its output folder)
    backfill: dict[str, Any]  # what the last start or reload queued, or what waits for confirmation

    def _wake(self) -> None:
        if self.app is not None:
            self.app.runner.wake()

    def info(self) -> dict[str, Any]:
        """This daemon's own account for `watcher status`: pid, since when, which services it holds and why."""
        paused: dict[str, str] = dict(self.held_services)
        if self.app is not None:
            for service, until in self.app.runner.paused_services().items():
                if service not in paused:
                    paused[service] = (
                        "its key is being checked"
                        if until == float("inf")
                        else f"the service refused the account; paused until {_iso(until)} (`watcher retry --failed`)"
                    )
        return {
            "pid": os.getpid(),
            "since": _iso(self.started_at),
            "paused_services": paused,
            "backfill": dict(self.backfill),
        }

    async def _command(self, request: dict[str, Any], progress: Progress) -> Any:
        """One request on the control socket, carried out by the same functions in watcher.commands as the page's."""
        name = request["command"]
        settings = self.settings
        paths = [Path(p) for p in request.get("paths") or []]
        if name == "status":
            return await asyncio.to_thread(
                commands.status, settings, daemon=self.info(), brief=bool(request.get("brief"))
            )
        if name == "retry":
            n = await asyncio.to_thread(
                commands.retry,
                settings,
                paths,
                failed=bool(request.get("failed")),
                in_doubt=bool(request.get("in_doubt")),
            )
            if self.app is not None:  # a service paused by a refusal is asked again; one whose key failed the
                for service in list(self.app.runner.paused_services()):  # check waits for a reload
                    if service not in self.held_services:
                        self.app.runner.resume_service(service)
            self._wake()
            return {"retried": n}
        if name in ("pause", "resume"):
            folder = await asyncio.to_thread(
                commands.pause, settings, Path(str(request.get("folder"))), paused=name == "pause"
            )
            self._wake()
            return {"folder": folder, "paused": name == "pause"}
        if name == "scan":
            app = await self._ready_app()

            async def tick(done: int, total: int) -> None:
                await progress({"done": done, "total": total})

            code, problems, promoted, paused = await commands.scan_running(app, paths, progress=tick)
            return {"exit": code, "problems": problems, "promoted": promoted, "paused": paused}
        if name == "web":
            return self._login()
        if name == "folders":
            return {"folders": [str(f.path) for f in settings.folders], "pid": os.getpid()}
        if name == "backfill":
            if not request.get("yes"):
                return await asyncio.to_thread(commands.backfill, settings, confirm=False)
            return await self._backfill(confirm=True)
        raise ConfigError(f"unknown command {name!r}")

    async def _ready_app(self, patience: float = 300.0) -> App:
        """The graph once its detector runs (a scan asked during start-up or a reload waits for it)."""
        deadline = time.monotonic() + patience
        while self.app is None or self.app.detector is None:
            if time.monotonic() > deadline or self._signals:
                raise ConfigError("the daemon is starting, stopping or reloading: try again in a moment")
            await asyncio.sleep(0.1)
        return self.app

    def _login(self) -> dict[str, Any]:
        """The page's address and a login link to it (made now that the port is bound), or why it does not run."""
        page = self._page
        if page is None:
            return {"running": False, "problem": "the page is off ([web] enabled = false)"}
        if self.web is None or page.url is None:
            return {"running": False, "problem": page.problem}
        from watcher.web.auth import load_token, login_link

        token = load_token(self.settings)
        return {"running": True, "url": page.url, "login": login_link(page.url, token)}

    async def _backfill(self, *, confirm: bool = False) -> dict[str, Any]:
        """Queue the work the config added for files already there (a start, a reload, or ``confirm``: the user
        said yes); one priced above ``[control] confirm_backfill_minutes`` waits for `watcher backfill --yes`."""
        from watcher import backfill as fill

        if not confirm and fill.covered(fill.asked(self.settings), fill.recorded(self.settings)):
            self.backfill = {}  # the config asks nothing it did not ask when the store last caught up
            return {"jobs": 0}
        limit = None if confirm else self.settings.control.confirm_backfill_minutes
        found = await asyncio.to_thread(commands.backfill, self.settings, confirm=True, limit=limit)
        if not found["waiting"]:  # caught up: the next start looks again only if the config asks for more
            await asyncio.to_thread(fill.record, self.settings)
        if not found["jobs"]:
            self.backfill = {}
            return found
        self.backfill = {
            "queued": found["queued"],
            "waiting": found["waiting"],
            "minutes": found["total_minutes"],
            "what": found["what"],
        }
        if found["queued"]:
            log.info(
                "backfill.queued",
                jobs=found["queued"],
                what=found["what"],
                audio_minutes=found["minutes"],
                next="the files already there get the work the config added (daily caps apply)",
            )
            self._wake()
        else:
            log.warning(
                "backfill.waiting",
                jobs=found["waiting"],
                what=found["what"],
                audio_minutes=found["minutes"],
                above=self.settings.control.confirm_backfill_minutes,
                next="`watcher backfill` shows it, `watcher backfill --yes` queues it",
            )
        return found

    def _unwritable_outputs(self) -> list[str]:
        """Each archive output folder that cannot be written, with why (checked at start and on every reload)."""
        s = self.settings
        outs = {s.output_dir_for(f) for f in s.folders} | {s.archive.output_dir}
        found = []
        for out in sorted(o for o in outs if o is not None):
            why = cannot_write(out)
            if why is not None:
                found.append(f"{display(str(out))}: {why}")
        return found

    def _check_keys(self, app: App) -> Callable[[], Coroutine[Any, Any, None]]:
        """Hold every paid service's work until its key passed a call that bills nothing (the one `watcher
        doctor` makes; the returned check is started once the daemon is ready); a refused key keeps its service
        paused until a reload, so no paid call is made with it.
        A key that passes makes the jobs that waited on its service (an earlier refusal) due at once."""
        services = {p.service for p in app.runner.pipelines.values() if p.service}
        for service in services:
            app.runner.pause_service(service)
        self.held_services = {}

        async def check() -> None:
            # the HTTP stack loads in a worker thread: on the loop it held the watchdog up for seconds at READY
            await asyncio.to_thread(importlib.import_module, "watcher.doctor")
            from watcher.doctor import check_keys

            outputs = await asyncio.to_thread(self._unwritable_outputs) if "processing" in services else []
            if outputs:
                why = "; ".join(outputs)
                self.held_services["processing"] = f"the output folder cannot be written: {why}"
                log.error(
                    "archive.output_unwritable",
                    error=why,
                    next="the archive stays paused before any upload (nothing is paid for); make the output folder "
                    "writable by the daemon's user, then reload",
                )
            checked = await check_keys(self.settings)
            for service in services - {found.service for found in checked} - set(self.held_services):
                app.runner.resume_service(service)  # nothing to check it with: its first request tells
            for found in checked:
                if found.refused is not None:
                    why = f"its key was refused ({found.refused}); the key comes from {found.source}"
                    self.held_services[found.service] = why
                    log.error(
                        "service.key_refused",
                        service=found.service,
                        source=found.source,
                        error=found.refused,
                        next=f"the {found.service} service stays paused and no paid request is sent with this key; "
                        "fix it, then reload (`systemctl reload watcher` or SIGHUP)",
                    )
                    continue
                if found.unchecked is not None:
                    log.warning(
                        "service.key_unchecked",
                        service=found.service,
                        error=found.unchecked,
                        next="going on: the first request tells (a refusal then pauses the service)",
                    )
                if found.service in self.held_services:  # the key is fine, but its output folder is not
                    continue
                pipelines = app.runner.pipelines_of(found.service)
                woken = await app.aio.retry(waiting_on_service=True, pipelines=pipelines)
                if woken:
                    log.info("service.resumed", service=found.service, jobs=woken, next="their files go on now")
                app.runner.resume_service(found.service)

        return check
