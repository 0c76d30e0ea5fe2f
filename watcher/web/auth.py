"""Who may use the page, and what a request may be: the token (configured, or generated once into the state
folder), one-time login links signed with it, server-side sessions behind a per-port cookie, the Host
allow-list, the Origin check on POSTs, the body size limit and the security headers every answer carries."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote, urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from watcher.config import Settings, read_secret_file, reveal
from watcher.errors import ConfigError

COOKIE_PREFIX = "watcher_session_"  # + the port: two daemons on one machine keep their own sessions
TOKEN_FILE = "web-token"  # noqa: S105 - a file name, not a secret
MIN_TOKEN = 16  # characters any token needs (a short one is guessed through the Bearer header)
MIN_EXPOSED_TOKEN = 32  # characters a token needs when the page listens beyond loopback
SESSION_SECONDS = 12 * 3600  # a session cookie's lifetime; logging out ends it at once
MAX_SESSIONS = 64  # the oldest session is dropped beyond this
LOGIN_SECONDS = 15 * 60  # how long a login link stays valid (and it works once)
LOGIN_ATTEMPTS = 10  # failed logins allowed per LOGIN_WINDOW, for everyone together, then 429
LOGIN_WINDOW = 60.0
MAX_BODY = 1024 * 1024  # bytes a request body may have; larger ones are refused (413) before they are read
BODY_SECONDS = 10.0  # a request body must arrive within this, once its headers are in (else 408)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # not no-referrer: a form POST would then send "Origin: null"
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
OPEN_PATHS = ("/login", "/healthz")  # the paths that need no session: logging in, and the health check


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8765`` for IPv6) as (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    """``0.0.0.0`` or ``::``: every address of the machine."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def load_token(settings: Settings) -> str:
    """The page's token: ``[web] token``, ``[web] token_file``, else ``state_dir/web-token``, created once with
    mode 0600."""
    cfg = settings.web
    if cfg.token is not None:
        return reveal(cfg.token) or ""
    if cfg.token_file is not None:
        return read_secret_file(cfg.token_file.expanduser(), "web.token_file").get_secret_value()
    path = settings.state_dir / TOKEN_FILE
    if path.exists():
        return read_secret_file(path, "the page's token file").get_secret_value()
    token = secrets.token_urlsafe(32)
    _write_private(path, token)
    return token


def _write_private(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")


def check_token(host: str, token: str) -> None:
    """ConfigError when the token is guessable: shorter than :data:`MIN_TOKEN` characters, or than
    :data:`MIN_EXPOSED_TOKEN` when the page would listen beyond loopback."""
    if len(token) < MIN_TOKEN:
        raise ConfigError(
            f"the page's token has {len(token)} characters, fewer than {MIN_TOKEN}: set a longer [web] token or "
            "token_file, or remove both so that watcher makes a random one in the state folder"
        )
    if not is_loopback(host) and len(token) < MIN_EXPOSED_TOKEN:
        raise ConfigError(
            f"web.listen {host} is not loopback: the page needs a token of at least {MIN_EXPOSED_TOKEN} characters "
            f"(this one has {len(token)}); set [web] token_file, or listen on 127.0.0.1"
        )


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


# -- login links and sessions ------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def login_nonce(token: str, *, now: float | None = None) -> str:
    """A login nonce: an expiry, a random part and their HMAC under the token. Anyone who can read the token
    (the daemon, ``watcher web``) can make one; it is valid :data:`LOGIN_SECONDS` and once."""
    expires = int((time.time() if now is None else now) + LOGIN_SECONDS)
    body = f"{expires}.{_b64(secrets.token_bytes(16))}"
    return f"{body}.{_sign(token, body)}"


def login_link(base_url: str, token: str) -> str:
    return f"{base_url}/login?nonce={quote(login_nonce(token))}"


def _sign(token: str, body: str) -> str:
    return _b64(hmac.new(token.encode(), b"login:" + body.encode(), hashlib.sha256).digest()[:24])


class Sessions:
    """The sessions the login links opened: random ids kept here (never the token), each with its expiry.
    A restart, :meth:`revoke` (logout) or :meth:`revoke_all` ends them."""

    def __init__(self, token: str) -> None:
        self.token = token
        self._live: OrderedDict[str, float] = OrderedDict()  # session id -> expiry (wall clock)
        self._used: dict[str, float] = {}  # login nonces already used -> their expiry
        self._failures: deque[float] = deque(maxlen=LOGIN_ATTEMPTS)  # when the last failed logins were

    def open(self, *, now: float | None = None) -> str:
        now = time.time() if now is None else now
        self._expire(now)
        sid = secrets.token_urlsafe(32)
        self._live[sid] = now + SESSION_SECONDS
        while len(self._live) > MAX_SESSIONS:
            self._live.popitem(last=False)
        return sid

    def valid(self, sid: str, *, now: float | None = None) -> bool:
        expires = self._live.get(sid)
        if expires is None:
            return False
        if expires <= (time.time() if now is None else now):
            del self._live[sid]
            return False
        return True

    def revoke(self, sid: str) -> None:
        self._live.pop(sid, None)

    def revoke_all(self) -> None:
        self._live.clear()

    def _expire(self, now: float) -> None:
        for sid in [s for s, e in self._live.items() if e <= now]:
            del self._live[sid]
        for nonce in [n for n, e in self._used.items() if e <= now]:
            del self._used[nonce]

    def redeem(self, nonce: str, *, now: float | None = None) -> bool:
        """True once for a login nonce made with this token and not expired."""
        now = time.time() if now is None else now
        self._expire(now)
        expires, _, rest = nonce.partition(".")
        body, _, sig = nonce.rpartition(".")
        if not (expires.isdigit() and rest and sig) or not same(sig, _sign(self.token, body)):
            return False
        if int(expires) <= now or int(expires) > now + LOGIN_SECONDS + 60 or nonce in self._used:
            return False
        self._used[nonce] = float(expires)
        return True

    def throttled(self) -> float:
        """Seconds until another login may be tried (0: now); after :data:`LOGIN_ATTEMPTS` failures a minute,
        from anyone, logins wait."""
        if len(self._failures) < LOGIN_ATTEMPTS:
            return 0.0
        return max(0.0, LOGIN_WINDOW - (time.monotonic() - self._failures[0]))

    def failed(self) -> None:
        self._failures.append(time.monotonic())


# -- the guard ------------------------------------------------------------------------------------


def allowed_hosts(listen_host: str, port: int, configured: Iterable[str]) -> tuple[frozenset[str], bool]:
    """The Host header values the page answers to, and whether any IP address is fine too (a wildcard
    listen address: DNS rebinding needs a name, so an address is never one).

    Built in: the listen address, ``localhost``, ``127.0.0.1`` and ``[::1]``, each with the port (without it
    too on port 80). Configured names (``[web] allowed_hosts``) match as given: with a port only that one.
    """
    names = {"localhost", "127.0.0.1", "[::1]"}
    if not is_wildcard(listen_host):
        names.add(f"[{listen_host}]" if ":" in listen_host else listen_host)
    hosts = {f"{n}:{port}" for n in names}
    if port == 80:
        hosts |= names
    hosts |= {h.lower() for h in configured}
    return frozenset(hosts), is_wildcard(listen_host)


class Guard:
    """ASGI middleware in front of the whole page, in this order: a Host header not allowed is 400; a POST
    whose Origin is not this page's is 403; every path but :data:`OPEN_PATHS` needs a Bearer token or a
    session cookie (else 401); a body over :data:`MAX_BODY` is 413, one slower than :data:`BODY_SECONDS` 408.
    Every answer gets the security headers."""

    def __init__(
        self, app: ASGIApp, sessions: Sessions, *, cookie: str, hosts: frozenset[str], any_address: bool = False
    ) -> None:
        self.app = app
        self.sessions = sessions
        self.cookie = cookie
        self.hosts = hosts
        self.any_address = any_address

    def session_of(self, headers: Headers) -> str | None:
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.cookie and value:
                return value
        return None

    def authorised(self, headers: Headers) -> bool:
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and same(auth[7:].strip(), self.sessions.token):
            return True
        sid = self.session_of(headers)
        return sid is not None and self.sessions.valid(sid)

    def host_allowed(self, host: str) -> bool:
        host = host.lower()
        name = _host_name(host)
        if host in self.hosts or name in self.hosts:
            return True
        if not self.any_address:
            return False
        try:
            ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            return False
        return True

    @staticmethod
    def foreign_origin(headers: Headers) -> bool:
        """A browser's POST from another site: Origin (or Referer) names a host other than the one asked."""
        origin = headers.get("origin") or headers.get("referer")
        if not origin:
            return False  # scripts (curl) send none; browsers always send Origin on a POST
        if origin == "null":
            return True
        return urlsplit(origin).netloc != headers.get("host", "")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no WebSocket here: the connection is closed without a word

        async def send_secure(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        headers = Headers(scope=scope)
        if not self.host_allowed(headers.get("host", "")):
            await plain(send_secure, 400, "this Host is not one the page answers to (see [web] allowed_hosts)")
            return
        if scope["method"] == "POST" and self.foreign_origin(headers):
            await plain(send_secure, 403, "cross-origin request refused")
            return
        if scope["path"] not in OPEN_PATHS and not self.authorised(headers):
            await plain(send_secure, 401, "log in with the link watcher printed at start, or send a Bearer token")
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            try:
                async with asyncio.timeout(BODY_SECONDS):
                    body = await _bounded_body(headers, receive)
            except TimeoutError:
                await plain(send_secure, 408, f"request body not received within {BODY_SECONDS:.0f} s")
                return
            if body is None:
                await plain(send_secure, 413, f"request body over {MAX_BODY} bytes refused")
                return
            receive = _replay(body)
        await self.app(scope, receive, send_secure)


def _host_name(host: str) -> str:
    """A Host header's name without its port: ``[::1]:8765`` -> ``[::1]``, ``nas.local:80`` -> ``nas.local``."""
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.partition(":")[0]


async def _bounded_body(headers: Headers, receive: Receive) -> bytes | None:
    """The whole request body, or None when it is (or says it is) over :data:`MAX_BODY`: a declared length
    is refused before a byte is read, a chunked body once it passes the limit."""
    declared = headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes) -> Receive:
    """A ``receive`` that gives ``body`` once, then waits for the client to go (as the real one does)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def plain(send: Send, status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """A short JSON answer ``{"detail": text}`` sent straight from the guard."""
    body = json.dumps({"detail": text}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="watcher"'))
    if status in (400, 408, 413):
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})
