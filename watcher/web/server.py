"""The page's server: Starlette on uvicorn inside the daemon's own event loop (no second process or thread).

:class:`WebServer` binds ``[web] listen`` itself, so a taken port is known at once: a warning naming the port,
and the daemon runs on without the page. The token's login link is logged once, when the token is generated;
after that the token is redacted from every log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from importlib import resources
from pathlib import Path
from typing import Any

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from watcher.errors import ConfigError
from watcher.log import register_secrets
from watcher.names import display
from watcher.web import api, pages
from watcher.web.api import Context, problem
from watcher.web.auth import COOKIE, Guard, check_exposure, is_loopback, load_token, login_link, same, split_listen

log = structlog.get_logger("watcher.web")
STATE_FILE = "web.json"  # tells `watcher status` whether the page runs, and where


def static_dir() -> Path:
    return Path(str(resources.files("watcher.web").joinpath("static")))


def contained(path: str, roots: list[str]) -> str | None:
    """The real path of ``path`` when it is a regular file inside one of ``roots`` (real paths), else None."""
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        return None
    for root in roots:
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return real
    return None


def build_app(ctx: Context, token: str) -> Guard:
    """The whole ASGI app: pages, API, audio, static files and (metrics on) /metrics, behind the guard."""

    async def login(request: Request) -> Response:
        given = request.query_params.get("token", "")
        if not given or not same(given, token):
            return problem(401, "this login link is not valid (the token is in the state folder's web-token)")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    async def overview(request: Request) -> Response:
        return HTMLResponse(pages.overview())

    async def files(request: Request) -> Response:
        return HTMLResponse(pages.file_list([display(f) for f in ctx.folders()]))

    async def file(request: Request) -> Response:
        path = request.query_params.get("path", "")
        info = await api.file_info(ctx, path) if path else None
        if info is None:
            return HTMLResponse(pages.not_found(f"{display(path)} is not a file watcher knows"), status_code=404)
        return HTMLResponse(pages.file_page(info))

    async def audio(request: Request) -> Response:
        real = contained(request.query_params.get("path", ""), ctx.audio_roots())
        if real is None:
            return problem(404, "no such audio file in the watched or output folders")
        disposition = "attachment" if request.query_params.get("download") else "inline"
        return FileResponse(real, filename=os.path.basename(real), content_disposition_type=disposition)

    async def metrics(request: Request) -> Response:
        if ctx.metrics is None:
            return problem(404, "metrics are off ([metrics] enabled = false)")
        return PlainTextResponse(ctx.metrics.exposition(), media_type="text/plain; version=0.0.4")

    routes: list[Any] = [
        Route("/login", login),
        Route("/", overview),
        Route("/files", files),
        Route("/file", file),
        Route("/audio", audio),
        *(Route(path, endpoint, methods=[method]) for method, path, endpoint in api.routes(ctx)),
        Route("/metrics", metrics),
        Mount("/static", app=StaticFiles(directory=static_dir()), name="static"),
    ]
    return Guard(Starlette(routes=routes), token)


class WebServer:
    """The page in the daemon's loop: :meth:`start` (False when it cannot run: the reason is logged and kept
    in ``problem``), :meth:`stop`. ``url`` is the page's address once started."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.url: str | None = None
        self.address: tuple[str, int] | None = None
        self.problem: str | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    def _state_path(self) -> Path:
        return self.ctx.settings.state_dir / STATE_FILE

    def _record(self) -> None:
        """Say in the state folder whether the page runs (read by `watcher status`)."""
        from watcher.fsutil import write_json_atomic

        doc = {"running": self.url is not None, "url": self.url, "problem": self.problem, "pid": os.getpid()}
        with contextlib.suppress(OSError):
            write_json_atomic(self._state_path(), doc)

    async def start(self) -> bool:
        cfg = self.ctx.settings.web
        host, port = split_listen(cfg.listen)
        try:
            token, fresh = load_token(self.ctx.settings)
            check_exposure(host, token)
        except ConfigError as exc:
            self.problem = str(exc)
            log.error("web.not_started", error=str(exc), next="running without the page")
            self._record()
            return False
        if not is_loopback(host):
            log.warning("web.exposed", listen=cfg.listen, next="anyone who can reach this address sees the login page")
        try:
            sock = _listen(host, port)
        except OSError as exc:
            taken = exc.errno == errno.EADDRINUSE
            self.problem = f"port {port} on {host} is {'already taken' if taken else 'unusable'}: {exc.strerror}"
            log.warning(
                "web.port_unavailable",
                listen=cfg.listen,
                error=self.problem,
                next="running without the page (is another watcher running?); set [web] listen",
            )
            self._record()
            return False
        await self._serve(sock, token)
        if fresh:
            log.info(
                "web.login",
                url=login_link(self.url or "", token),
                next="open this link once; the token is kept in the state folder's web-token (mode 0600)",
            )
        else:
            log.info("web.serving", url=self.url, next="log in with the link printed when the token was made")
        register_secrets([token])  # never again in a log line
        self._record()
        return True

    async def _serve(self, sock: socket.socket, token: str) -> None:
        """Run uvicorn on the bound socket, in this event loop."""
        self._socket = sock
        bound = sock.getsockname()
        self.address = (str(bound[0]), int(bound[1]))
        shown = f"[{bound[0]}]" if ":" in str(bound[0]) else str(bound[0])
        self.url = f"http://{shown}:{bound[1]}"
        config = uvicorn.Config(
            build_app(self.ctx, token),
            lifespan="off",
            access_log=False,
            log_config=None,
            log_level="warning",
            timeout_graceful_shutdown=1,
            ws="none",
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        self._server = server
        self._task = asyncio.create_task(server.main_loop(), name="web")

    async def stop(self) -> None:
        self.ctx.live.close()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._task
            await self._server.shutdown(sockets=[self._socket] if self._socket else None)
        self._server = self._task = None
        self.url = None
        with contextlib.suppress(OSError):
            self._state_path().unlink()


def _listen(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket on ``host:port`` (OSError when the port is taken or unusable)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
