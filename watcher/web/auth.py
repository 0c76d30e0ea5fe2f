"""Who may use the page: the token (configured, or generated once into the state folder), the session cookie
that ``/login`` sets from it, the Origin check on POSTs, and the security headers every answer carries."""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from pathlib import Path
from urllib.parse import quote, urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from watcher.config import Settings, read_secret_file, reveal
from watcher.errors import ConfigError

COOKIE = "watcher_session"
TOKEN_FILE = "web-token"  # noqa: S105 - a file name, not a secret
MIN_EXPOSED_TOKEN = 32  # characters a token needs when the page listens beyond loopback
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
OPEN_PATHS = ("/login",)  # the only path that needs no token (it takes one)


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


def load_token(settings: Settings) -> tuple[str, bool]:
    """The page's token and whether it was generated just now (then the login link is shown once).

    Order: ``[web] token``, ``[web] token_file``, else ``state_dir/web-token``, created with mode 0600.
    """
    cfg = settings.web
    if cfg.token is not None:
        return reveal(cfg.token) or "", False
    if cfg.token_file is not None:
        return read_secret_file(cfg.token_file.expanduser(), "web.token_file").get_secret_value(), False
    path = settings.state_dir / TOKEN_FILE
    if path.exists():
        return read_secret_file(path, "the page's token file").get_secret_value(), False
    token = secrets.token_urlsafe(32)
    _write_private(path, token)
    return token, True


def login_link(url: str, token: str) -> str:
    """The link that logs a browser in to the page at ``url`` (the one place that makes it)."""
    return f"{url}/login?token={quote(token)}"


def _write_private(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")


def check_exposure(host: str, token: str) -> None:
    """ConfigError when the page would listen beyond loopback with a guessable token."""
    if not is_loopback(host) and len(token) < MIN_EXPOSED_TOKEN:
        raise ConfigError(
            f"web.listen {host} is not loopback: the page needs a token of at least {MIN_EXPOSED_TOKEN} characters "
            f"(this one has {len(token)}); set [web] token_file, or listen on 127.0.0.1"
        )


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class Guard:
    """ASGI middleware: a Bearer token or the session cookie on every request but ``/login`` (else 401);
    a POST whose Origin is not this page's is 403; every answer gets the security headers."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    def authorised(self, headers: Headers) -> bool:
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and same(auth[7:].strip(), self.token):
            return True
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and same(value, self.token):
                return True
        return False

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
            await self.app(scope, receive, send)
            return

        async def send_secure(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        headers = Headers(scope=scope)
        if scope["method"] == "POST" and self.foreign_origin(headers):
            await _plain(send_secure, 403, "cross-origin request refused")
            return
        if scope["path"] not in OPEN_PATHS and not self.authorised(headers):
            await _plain(send_secure, 401, "log in with the link watcher printed at start, or send a Bearer token")
            return
        await self.app(scope, receive, send_secure)


async def _plain(send: Send, status: int, text: str) -> None:
    body = f'{{"detail": "{text}"}}'.encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="watcher"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
