"""The page's server: Starlette on uvicorn inside the daemon's own event loop (no second process or thread).

:class:`WebServer` binds ``[web] listen`` itself, so a taken port is known at once: a warning naming the port,
and the daemon runs on without the page. Once the port is bound, a one-time login link (a nonce signed with
the token, never the token) is logged; the token itself is redacted from every log line. Connections are
capped and timed (see :mod:`watcher.web.limits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import socket
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from watcher.errors import ConfigError
from watcher.log import register_secrets
from watcher.names import display, find_shown
from watcher.web import api, limits, pages
from watcher.web.api import Context, path_param, problem
from watcher.web.auth import (
    COOKIE_PREFIX,
    SESSION_SECONDS,
    Guard,
    Sessions,
    allowed_hosts,
    check_token,
    is_loopback,
    is_wildcard,
    load_token,
    login_link,
    same,
    split_listen,
)

log = structlog.get_logger("watcher.web")
STATE_FILE = "web.json"  # tells `watcher status` whether the page runs, and where
MAX_LOGIN_FORM = 4096  # bytes: a token, and room for a browser's form encoding


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


def audio_type(path: str) -> str | None:
    """The one type /audio serves ``path`` as (by its extension), or None when the page plays no such file."""
    return pages.AUDIO_TYPES.get(os.path.splitext(path)[1].lstrip(".").lower())


def cookie_name(port: int) -> str:
    return f"{COOKIE_PREFIX}{port}"


def build_app(ctx: Context, sessions: Sessions, *, port: int, hosts: frozenset[str], any_address: bool) -> Guard:
    """The whole ASGI app: pages, API, audio, static files and (metrics on) /metrics, behind the guard."""
    cookie = cookie_name(port)
    h = _Handlers(ctx, sessions, cookie)
    routes: list[Any] = [
        Route("/login", h.login, methods=["GET", "POST"]),
        Route("/logout", h.logout, methods=["POST"]),
        Route("/", h.overview),
        Route("/files", h.files),
        Route("/file", h.file),
        Route("/audio", h.audio),
        *(Route(path, endpoint, methods=[method]) for method, path, endpoint in api.routes(ctx)),
        Route("/metrics", h.metrics),
        Route("/healthz", h.healthz),
        Mount("/static", app=StaticFiles(directory=static_dir()), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={Exception: _failed})
    return Guard(app, sessions, cookie=cookie, hosts=hosts, any_address=any_address)


async def _failed(request: Request, exc: Exception) -> Response:
    """A request that failed unexpectedly: said in the daemon's log (what was asked, what went wrong, secrets
    redacted) and answered 500 naming only the kind of error; the daemon and the other requests go on."""
    path, kind = request.url.path, type(exc).__name__
    log.error("web.request_failed", method=request.method, path=path, error=f"{kind}: {exc}", next="answered 500")
    return problem(500, f"{path} failed ({kind}); the daemon's log says more; the page asks again")


class _Handlers:
    """The route handlers of the pages (the JSON API's are in watcher.web.api), over one context and sessions."""

    def __init__(self, ctx: Context, sessions: Sessions, cookie: str) -> None:
        self.ctx, self.sessions, self.cookie = ctx, sessions, cookie

    def logged_in(self) -> Response:
        """A new session's cookie, and on to the overview."""
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            self.cookie, self.sessions.open(), max_age=SESSION_SECONDS, httponly=True, samesite="strict", path="/"
        )
        return response

    def refused(self, request: Request, message: str, *, tried: bool = True) -> Response:
        """401 with the form; 429 with Retry-After once too many logins failed this minute (``tried``: this
        request was a failed login, not one turned away unread)."""
        if tried:
            self.sessions.failed()
        wait = self.sessions.throttled()
        if not wait:
            return pages.render(request, "login", 401, title="Log in", message=message)
        message = f"Too many failed logins: wait {int(wait) + 1} s and try again."
        response = pages.render(request, "login", 429, title="Log in", message=message)
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response

    async def login(self, request: Request) -> Response:
        """A login link (GET ``?nonce=``) or the token from the form (POST) opens a session; else the form.

        Failures are counted for everyone together: past the limit every token tried waits (429) before it is
        even compared. A valid login link still works then (it tells nothing about the token, and a guessed
        one would need its 192-bit signature), so `watcher web` always lets the user in."""
        if request.method == "GET":
            nonce = request.query_params.get("nonce", "")
            if not nonce:
                return pages.render(request, "login", title="Log in", message=None)
            if self.sessions.redeem(nonce):
                return self.logged_in()
            return self.refused(
                request,
                "This login link is not valid: it was used already, has expired (after 15 minutes) or is not this "
                "page's. `watcher web` prints a new one.",
            )
        if self.sessions.throttled():
            return self.refused(request, "", tried=False)
        form = parse_qs((await request.body())[:MAX_LOGIN_FORM].decode("utf-8", "replace"))
        if same(form.get("token", [""])[0].strip(), self.sessions.token):
            return self.logged_in()
        return self.refused(request, "That token is not the page's.")

    async def logout(self, request: Request) -> Response:
        """The session ends (its cookie too), and on to the login form."""
        sid = request.cookies.get(self.cookie)
        if sid:
            self.sessions.revoke(sid)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(self.cookie, httponly=True, samesite="strict", path="/")
        return response

    async def overview(self, request: Request) -> Response:
        """The overview page."""
        return pages.render(request, "overview", title="Overview")

    async def files(self, request: Request) -> Response:
        """The files page, with the watched folders to filter by."""
        folders = [display(f) for f in self.ctx.folders()]
        return pages.render(request, "files", title="Files", states=pages.STATES, folders=folders)

    async def file(self, request: Request) -> Response:
        """One file's page (``?path=``), 404 for a file watcher does not know."""
        path = path_param(request.query_params.get("path"))
        info = await api.file_info(self.ctx, path) if path else None
        if info is None:
            shown = display(path or "that path")
            detail = f"{shown} is not a file watcher knows"
            return pages.render(request, "message", 404, title="Not found", page="none", detail=detail)
        return pages.render(request, "file", **pages.file_context(info))

    async def audio(self, request: Request) -> Response:
        """An audio file of the folders, always as its fixed audio type (by the real file's extension)."""
        path = path_param(request.query_params.get("path"))
        roots = self.ctx.audio_roots
        real = await asyncio.to_thread(lambda: path and contained(find_shown(path) or path, roots()))
        kind = audio_type(real) if real else None
        if not real or kind is None:
            return problem(404, "no such audio file (wav, flac, mp3, m4a, ogg, aiff) in the watched or output folders")
        disposition = "attachment" if request.query_params.get("download") else "inline"
        return FileResponse(
            real, media_type=kind, filename=os.path.basename(real), content_disposition_type=disposition
        )

    async def healthz(self, request: Request) -> Response:
        """Open to all (container health checks): only whether the daemon's heartbeat is current, nothing else."""
        healthy = self.ctx.healthy()
        return JSONResponse({"healthy": healthy}, status_code=200 if healthy else 503)

    async def metrics(self, request: Request) -> Response:
        """The Prometheus exposition, 404 when metrics are off."""
        if self.ctx.metrics is None:
            return problem(404, "metrics are off ([metrics] enabled = false)")
        return PlainTextResponse(self.ctx.metrics.exposition(), media_type="text/plain; version=0.0.4")


def reachable_address() -> str | None:
    """This machine's address on its default route (a UDP socket's choice: nothing is sent), or None."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere, only used to pick the source
        address = str(probe.getsockname()[0])
        return None if address.startswith(("0.", "127.")) else address
    return None


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
        self.sessions: Sessions | None = None  # the page's logins, while it runs

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
            token = load_token(self.ctx.settings)
            check_token(host, token)
        except ConfigError as exc:
            self.problem = str(exc)
            log.error("web.not_started", error=str(exc), next="running without the page")
            self._record()
            return False
        register_secrets([token])  # never in a log line
        gate = limits.Gate(limits.connection_cap(resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
        try:
            sock = limits.listen(host, port, gate)
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
        await self._serve(sock, token, host, gate)
        assert self.url is not None and self.address is not None
        if not is_loopback(host):
            shown = (reachable_address() or socket.gethostname()) if is_wildcard(host) else host
            reach = f"http://{f'[{shown}]' if ':' in shown else shown}:{self.address[1]}"
            log.warning(
                "web.exposed",
                listen=cfg.listen,
                url=reach,
                next="anyone who can reach this address sees the login page, and the token, login links and "
                "session cookies cross the network in cleartext (plain HTTP): use a network you trust, or "
                "listen on 127.0.0.1 behind a TLS reverse proxy; names used to reach it go in [web] allowed_hosts",
            )
        log.info(
            "web.login",
            url=login_link(self.url, token),
            next="open this link within 15 minutes, once; `watcher web` prints a new one",
        )
        self._record()
        return True

    async def _serve(self, sock: socket.socket, token: str, host: str, gate: limits.Gate) -> None:
        """Run uvicorn on the bound socket, in this event loop, with the connection cap and timeouts."""
        self._socket = sock
        bound = sock.getsockname()
        self.address = (str(bound[0]), int(bound[1]))
        if is_wildcard(host):  # what `watcher status` and the login link name: usable from this machine
            shown = "[::1]" if ":" in host else "127.0.0.1"
        else:
            shown = f"[{bound[0]}]" if ":" in str(bound[0]) else str(bound[0])
        self.url = f"http://{shown}:{bound[1]}"
        hosts, any_address = allowed_hosts(host, self.address[1], self.ctx.settings.web.allowed_hosts)
        self.sessions = Sessions(token)
        config = uvicorn.Config(
            build_app(self.ctx, self.sessions, port=self.address[1], hosts=hosts, any_address=any_address),
            lifespan="off",
            access_log=False,
            log_config=None,
            log_level="warning",
            timeout_graceful_shutdown=1,
            ws="none",
            http=limits.guarded_protocol(gate),
            limit_concurrency=gate.cap + 1,  # uvicorn counts the asking connection too
            timeout_keep_alive=limits.KEEP_ALIVE_SECONDS,
            h11_max_incomplete_event_size=limits.MAX_HEADER_BYTES,
            backlog=limits.BACKLOG,
            server_header=False,
        )
        config.load()
        limits.quiet_uvicorn_log()
        server = uvicorn.Server(config)
        gate.connections = server.server_state.connections
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        self._server = server
        self._task = asyncio.create_task(server.main_loop(), name="web")

    async def stop(self) -> None:
        self.ctx.live.close()
        await asyncio.to_thread(self.ctx.close)
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._task
            await self._server.shutdown(sockets=[self._socket] if self._socket else None)
        self._server = self._task = None
        self.url = None
        with contextlib.suppress(OSError):
            self._state_path().unlink()
