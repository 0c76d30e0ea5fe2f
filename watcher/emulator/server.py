"""A small threaded HTTP/1.1 server on loopback that hosts the emulated service apps.

Each app contributes routes; the server records every request it receives (method, route, headers) so
that tests can count calls per endpoint and check which headers reached which host.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog

log = structlog.get_logger("watcher.emulator")


@dataclass
class RecordedRequest:
    """What the server saw of one request (the body is not kept)."""

    method: str
    route: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


class Request:
    """One incoming request as handlers see it: parsed path, query, headers, a streamed body, replies."""

    def __init__(self, handler: BaseHTTPRequestHandler, match: re.Match[str]) -> None:
        self.handler = handler
        self.match = match
        parts = urlsplit(handler.path)
        self.path = parts.path
        self.query = parse_qs(parts.query)
        self.headers = handler.headers
        self._body_read = False

    def param(self, name: str) -> str:
        return self.match.group(name)

    def iter_body(self, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        """The request body in chunks, from Content-Length or chunked transfer coding."""
        self._body_read = True
        rfile = self.handler.rfile
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                line = rfile.readline(1024)
                if not line:
                    raise ConnectionError("client closed the connection in a chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                remaining = size
                while remaining:
                    data = rfile.read(min(chunk_size, remaining))
                    if not data:
                        raise ConnectionError("client closed the connection in a chunk")
                    remaining -= len(data)
                    yield data
                rfile.readline(1024)
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            data = rfile.read(min(chunk_size, remaining))
            if not data:
                raise ConnectionError("client closed the connection before the body ended")
            remaining -= len(data)
            yield data

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

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.handler.send_response(status)
        self.handler.send_header("Content-Type", "application/json")
        self.handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.handler.send_header(key, value)
        self.handler.end_headers()
        self.handler.wfile.write(data)

    def send_bytes(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.handler.send_response(status)
        self.handler.send_header("Content-Type", content_type)
        self.handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.handler.send_header(key, value)
        self.handler.end_headers()
        self.handler.wfile.write(data)

    def redirect(self, location: str, status: int = 307) -> None:
        self.handler.send_response(status)
        self.handler.send_header("Location", location)
        self.handler.send_header("Content-Length", "0")
        self.handler.end_headers()

    def abort_connection(self) -> None:
        """Drop the TCP connection without a proper end, as a failing proxy would."""
        self.handler.close_connection = True
        with contextlib.suppress(OSError):
            self.handler.wfile.flush()
        self.handler.connection.shutdown(2)  # SHUT_RDWR


Handler = Callable[[Request], None]


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    name: str


@dataclass
class App:
    """A set of routes; an emulated service is one or more apps."""

    routes: list[Route] = field(default_factory=list)

    def route(self, method: str, pattern: str, name: str | None = None) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            self.routes.append(Route(method, re.compile(f"^{pattern}$"), fn, name or pattern))
            return fn

        return register


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the emulator logs through structlog
        return

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        for app in self.server.apps:
            for route in app.routes:
                if route.method != self.command:
                    continue
                match = route.pattern.match(path)
                if match is None:
                    continue
                request = Request(self, match)
                self.server.record(
                    RecordedRequest(self.command, route.name, path, request.query, dict(self.headers.items()))
                )
                try:
                    route.handler(request)
                except (ConnectionError, OSError):
                    self.close_connection = True
                    return
                except Exception as exc:  # an emulator bug must show, not hang the client
                    log.exception("emulator.handler_failed", route=route.name)
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        request.send_json(500, {"detail": f"emulator error: {exc}"})
                    return
                if not request._body_read and self.headers.get("Content-Length", "0") != "0":
                    self.close_connection = True
                return
        self.server.record(RecordedRequest(self.command, "unknown", path, {}, dict(self.headers.items())))
        data = json.dumps({"detail": "Not Found"}).encode()
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _dispatch


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], apps: list[App]) -> None:
        super().__init__(address, _Handler)
        self.apps = apps
        self.lock = threading.Lock()
        self.requests: list[RecordedRequest] = []

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hangs up mid-request is normal here (faults, cancelled uploads): no traceback."""
        log.debug("emulator.connection_error", client=str(client_address))

    def record(self, request: RecordedRequest) -> None:
        with self.lock:
            self.requests.append(request)


class HTTPServerThread:
    """A loopback server running in a background thread; ``url`` is set once it listens."""

    def __init__(self, apps: list[App], host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _Server((host, port), apps)
        # A short poll interval makes stop() quick (the default 0.5 s adds up over a test suite).
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="emulator-http", daemon=True
        )
        address = self._server.server_address
        self.host = str(address[0])
        self.port = int(address[1])
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}"

    def start(self) -> HTTPServerThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def serve_forever(self) -> None:
        """Serve in the calling thread (for `watcher emulate`)."""
        self._server.serve_forever()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._server.lock:
            return list(self._server.requests)

    def counts(self) -> Counter[str]:
        """Requests received per route name (for example ``"POST /from-file"``)."""
        return Counter(r.route for r in self.requests)

    def reset(self) -> None:
        with self._server.lock:
            self._server.requests.clear()
