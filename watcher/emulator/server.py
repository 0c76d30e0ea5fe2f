"""The emulated services' loopback server: Starlette on uvicorn, in a background thread.

Each app contributes routes; the server records every request it receives (method, route, headers) so
that tests can count calls per endpoint and check which headers reached which host. Route handlers are
plain blocking functions (they stream bodies, sleep to emulate slow links, drop connections); each runs in
a worker thread and talks to its ASGI request through :class:`Request`, which bridges to the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import anyio
import anyio.from_thread
import anyio.to_thread
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.routing import Mount
from starlette.types import Message, Receive, Scope, Send

from watcher.emulator.faults import RateLimit

log = structlog.get_logger("watcher.emulator")
TRANSPORT_KEY = "watcher.transport"  # the scope key under which the connection's transport is kept


@dataclass
class RecordedRequest:
    """What the server saw of one request (the body is not kept).

    ``arrived`` is ``time.monotonic()`` when the request's headers reached the server (before its body is
    read), for measuring how long a client took to start a request after some event.
    """

    method: str
    route: str
    path: str
    query: dict[str, list[str]]
    headers: Headers  # a case-insensitive mapping
    arrived: float = field(default_factory=time.monotonic)
    refused: bool = False  # answered 429 by the service's rate limit (App.limit)


class Request:
    """One incoming request as a blocking handler sees it: path, query, headers, a streamed body, replies.

    Replies: ``send_json``/``send_bytes``/``redirect`` for whole answers, or ``start`` then ``write`` for a
    streamed one (ended when the handler returns); ``abort_connection`` drops the TCP connection.
    """

    def __init__(self, scope: Scope, receive: Receive, send: Send, match: re.Match[str]) -> None:
        self.match = match
        self.path: str = scope["path"]
        self.query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        self.headers = Headers(scope=scope)
        self._receive = receive
        self._send = send
        self._transport: asyncio.Transport | None = scope.get(TRANSPORT_KEY)
        self._body_read = False
        self._body_done = False
        self.started = False
        self.ended = False
        self.aborted = False

    def param(self, name: str) -> str:
        return self.match.group(name)

    async def _next_message(self) -> Message:
        return await self._receive()

    async def _deliver(self, message: Message) -> None:
        await self._send(message)

    def _closing(self) -> bool:
        return self.aborted or (self._transport is not None and self._transport.is_closing())

    def iter_body(self, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        """The request body in chunks as they arrive (the server undoes any transfer coding)."""
        self._body_read = True
        while not self._body_done:
            message = anyio.from_thread.run(self._next_message)
            if message["type"] == "http.disconnect":
                raise ConnectionError("client closed the connection before the body ended")
            self._body_done = not message.get("more_body", False)
            data: bytes = message.get("body", b"")
            for i in range(0, len(data), chunk_size):
                yield data[i : i + chunk_size]

    def body(self, limit: int = 1 << 20) -> bytes:
        """The whole (small) body; used for JSON and form requests only."""
        out = bytearray()
        for chunk in self.iter_body():
            out += chunk
            if len(out) > limit:
                raise ValueError("request body too large for this endpoint")
        return bytes(out)

    def json(self) -> Any:
        raw = self.body()
        return json.loads(raw) if raw else {}

    def drain(self) -> None:
        """Read and discard an unread body so the connection stays usable."""
        if not self._body_read:
            for _ in self.iter_body():
                pass

    def start(self, status: int, headers: dict[str, str] | None = None) -> None:
        """Send the status line and headers; without Content-Length the body is chunked (HTTP/1.1).

        A request whose body was not read to its end gets ``Connection: close``, as the rest is never read.
        """
        if self._closing():
            raise ConnectionResetError("the client connection is closed")
        pairs = [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in (headers or {}).items()]
        if not self._body_done and all(k != b"connection" for k, _ in pairs):
            pairs.append((b"connection", b"close"))
        self.started = True
        anyio.from_thread.run(self._deliver, {"type": "http.response.start", "status": status, "headers": pairs})

    def write(self, data: bytes) -> None:
        """Send part of a started body; ConnectionResetError once the client has gone."""
        if self._closing():
            raise ConnectionResetError("the client connection is closed")
        anyio.from_thread.run(self._deliver, {"type": "http.response.body", "body": data, "more_body": True})

    def end(self, data: bytes = b"") -> None:
        """Finish a started body."""
        if self.ended or self._closing():
            return
        self.ended = True
        anyio.from_thread.run(self._deliver, {"type": "http.response.body", "body": data, "more_body": False})

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(payload).encode(), "application/json", headers)

    def send_bytes(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.start(status, {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})})
        self.end(data)

    def redirect(self, location: str, status: int = 307) -> None:
        self.start(status, {"Location": location, "Content-Length": "0"})
        self.end()

    def abort_connection(self) -> None:
        """Drop the TCP connection without a proper end, as a failing proxy would (data sent so far arrives)."""
        self.aborted = True
        if self._transport is not None:
            anyio.from_thread.run_sync(self._transport.close)


Handler = Callable[[Request], None]


KEY_CHECK = " (key check)"  # added to the route name of a request that only checks the key (bills nothing)


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    name: str
    key_check: Callable[[str, dict[str, list[str]]], bool] | None = None  # (path, query): a key check?

    def name_for(self, path: str, query: dict[str, list[str]]) -> str:
        """The name a request is recorded under: a key check is told apart, so counts of real calls stay exact."""
        return self.name + KEY_CHECK if self.key_check is not None and self.key_check(path, query) else self.name


@dataclass
class App:
    """A set of routes; an emulated service is one or more apps. ``limit``: the service's rate limit per key."""

    routes: list[Route] = field(default_factory=list)
    limit: RateLimit | None = None

    def route(
        self,
        method: str,
        pattern: str,
        name: str | None = None,
        *,
        key_check: Callable[[str, dict[str, list[str]]], bool] | None = None,
    ) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            self.routes.append(Route(method, re.compile(f"^{pattern}$"), fn, name or pattern, key_check))
            return fn

        return register


class _Dispatcher:
    """The ASGI endpoint behind Starlette: finds the route, records the request, runs the handler in a thread."""

    def __init__(self, apps: list[App], record: Callable[[RecordedRequest], None]) -> None:
        self.apps = apps
        self.record = record
        self._limiter: anyio.CapacityLimiter | None = None

    def _find(self, method: str, path: str) -> tuple[App, Route, re.Match[str]] | None:
        for app in self.apps:
            for route in app.routes:
                match = route.pattern.match(path) if route.method == method else None
                if match is not None:
                    return app, route, match
        return None

    @staticmethod
    async def _refuse(receive: Receive, send: Send, retry_after: float) -> None:
        """429 with Retry-After, the body read first so the client is never cut off mid-upload."""
        message: Message = {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                return
        data = json.dumps({"detail": "Too Many Requests"}).encode()
        pairs = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            (b"retry-after", f"{max(0.001, retry_after):.3f}".encode()),
        ]
        await send({"type": "http.response.start", "status": 429, "headers": pairs})
        await send({"type": "http.response.body", "body": data})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived = time.monotonic()
        method, path = scope["method"], scope["path"]
        headers = Headers(scope=scope)
        found = self._find(method, path)
        if found is None:
            self.record(RecordedRequest(method, "unknown", path, {}, headers, arrived))
            data = json.dumps({"detail": "Not Found"}).encode()
            pairs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
            await send({"type": "http.response.start", "status": 404, "headers": pairs})
            await send({"type": "http.response.body", "body": data})
            return
        app, route, match = found
        request = Request(scope, receive, send, match)
        named = route.name_for(path, request.query)
        wait = app.limit.admit(headers.get(app.limit.key_header, ""), named, arrived) if app.limit else None
        self.record(RecordedRequest(method, named, path, request.query, headers, arrived, wait is not None))
        if wait is not None:
            await self._refuse(receive, send, wait)
            return
        if self._limiter is None:  # handlers block (slow links, long streams): many may run at once
            self._limiter = anyio.CapacityLimiter(256)
        await anyio.to_thread.run_sync(self._run, route, request, limiter=self._limiter)
        if request.aborted or not request.started:
            # Wait until the server has seen the connection go, so it does not answer in our place.
            with anyio.move_on_after(2):
                while (await receive())["type"] != "http.disconnect":
                    pass

    @staticmethod
    def _run(route: Route, request: Request) -> None:
        try:
            route.handler(request)
            if request.started:
                request.end()
        except (ConnectionError, OSError):
            request.abort_connection()
        except Exception as exc:  # an emulator bug must show, not hang the client
            log.exception("emulator.handler_failed", route=route.name)
            if request.started:
                request.abort_connection()
            else:
                with contextlib.suppress(OSError):
                    request.send_json(500, {"detail": f"emulator error: {exc}"})
        if not request.started and not request.aborted:  # a handler that answered nothing: drop, as before
            request.abort_connection()


def _with_transport(app: Starlette) -> Callable[[Scope, Receive, Send], Any]:
    """Keep the connection's transport in the scope (uvicorn's ``send`` is bound to its request cycle),
    so that a handler can drop the connection the way a failing service does."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[TRANSPORT_KEY] = getattr(getattr(send, "__self__", None), "transport", None)
        await app(scope, receive, send)

    return asgi


class _Server(uvicorn.Server):
    """A uvicorn server that tells another thread when it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()


class HTTPServerThread:
    """A loopback Starlette server running in a background thread; ``url`` is known before it starts."""

    def __init__(self, apps: list[App], host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self.on_request: Callable[[RecordedRequest], None] | None = None  # told of each request (`watcher emulate`)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self._socket.listen(128)
        address = self._socket.getsockname()
        self.host = str(address[0])
        self.port = int(address[1])
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}"
        starlette = Starlette(routes=[Mount("", app=_Dispatcher(apps, self._record))])
        config = uvicorn.Config(
            _with_transport(starlette),
            lifespan="off",
            access_log=False,
            log_config=None,
            log_level="warning",
            timeout_graceful_shutdown=1,
            ws="none",
        )
        self._server = _Server(config)
        self._thread = threading.Thread(target=self.serve_forever, name="emulator-http", daemon=True)

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)
        if self.on_request is not None:
            self.on_request(request)

    def start(self) -> HTTPServerThread:
        self._thread.start()
        if not self._server.listening.wait(10):
            raise RuntimeError(f"the emulator server on {self.url} did not start")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._server.force_exit = True
        if self._thread.is_alive():
            self._thread.join(10)
        self._socket.close()

    def serve_forever(self) -> None:
        """Serve in the calling thread (for `watcher emulate`) until ``stop`` or a signal."""
        self._server.run(sockets=[self._socket])

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def counts(self) -> Counter[str]:
        """Requests received per route name (for example ``"POST /from-file"``)."""
        return Counter(r.route for r in self.requests)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
