"""httpcore's network backend on asyncio itself, in place of anyio's: fewer layers per connection and per read.

Imported by the HTTP policy at its first request, with httpx (not at start).

A plain TCP connection is a bare non-blocking socket driven by ``loop.sock_recv``/``loop.sock_sendall``: each
call first tries the socket directly, and a body block the socket does not take at once is sent from the
caller's buffer as the socket drains (asyncio's transports copy that remainder into their own buffer).
``start_tls`` hands the socket to an asyncio SSL transport. Timeouts are the ones httpcore passes, per call;
failures raise httpcore's own exceptions (ConnectError, ConnectTimeout, ReadError, ReadTimeout, WriteError,
WriteTimeout), which httpx maps as it maps anyio's. A call cancelled mid-way leaves the connection unfinished
in h11's eyes, so httpcore closes it rather than reuse it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import socket
import ssl
from asyncio.staggered import staggered_race
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

import httpcore
import httpx
from httpcore._utils import is_socket_readable  # the check httpcore's own backends use for idle connections

HAPPY_EYEBALLS_DELAY = 0.25  # seconds before the next address of a host is tried (RFC 8305), as anyio does
READ_LIMIT = 1 << 18  # a TLS connection stops reading from the socket while this much is unread
SocketOption = tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
T = TypeVar("T")


@contextlib.contextmanager
def _mapped(timeout_error: type[Exception], os_error: type[Exception]) -> Iterator[None]:
    """Raise httpcore's exception for an asyncio timeout or a socket error (with the cause kept)."""
    try:
        yield
    except TimeoutError as exc:
        raise timeout_error(str(exc) or type(exc).__name__) from exc
    except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
        raise os_error(str(exc) or type(exc).__name__) from exc


async def _within(timeout: float | None, work: Awaitable[T]) -> T:
    """``work`` awaited for at most ``timeout`` seconds (None: no limit); TimeoutError when over."""
    if timeout is None:
        return await work
    async with asyncio.timeout(timeout):
        return await work


class SocketStream(httpcore.AsyncNetworkStream):
    """A connected plain TCP (or Unix) socket, read and written through the running loop without a transport."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _mapped(httpcore.ReadTimeout, httpcore.ReadError):
            try:
                return self._sock.recv(max_bytes)  # data already there: no wait, no timer
            except (BlockingIOError, InterruptedError):
                pass
            return await _within(timeout, self._loop.sock_recv(self._sock, max_bytes))

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        with _mapped(httpcore.WriteTimeout, httpcore.WriteError):
            try:
                sent = self._sock.send(buffer)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent < len(buffer):  # the rest leaves from this buffer as the socket drains: no copy
                await _within(timeout, self._loop.sock_sendall(self._sock, memoryview(buffer)[sent:]))

    async def aclose(self) -> None:
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock)
            self._loop.remove_writer(self._sock)
        self._sock.close()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        """This connection under TLS (for https, and for https through a proxy): an asyncio SSL transport."""
        protocol = _Buffered()
        try:
            with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
                await _within(
                    timeout,
                    self._loop.create_connection(
                        lambda: protocol, sock=self._sock, ssl=ssl_context, server_hostname=server_hostname
                    ),
                )
        except BaseException:
            if protocol.transport is not None:
                protocol.transport.abort()
            self._sock.close()
            raise
        return TLSStream(protocol, self._sock)

    def get_extra_info(self, info: str) -> Any:
        return _extra(self._sock, info, None)


def _extra(sock: socket.socket, info: str, ssl_object: ssl.SSLObject | None) -> Any:
    """What httpcore asks of a stream by name (``is_readable`` tells an idle pooled connection was closed)."""
    if info == "ssl_object":
        return ssl_object
    try:
        if info == "client_addr":
            return sock.getsockname()
        if info == "server_addr":
            return sock.getpeername()
    except OSError:  # closed meanwhile
        return None
    if info == "socket":
        return sock
    if info == "is_readable":
        return is_socket_readable(sock)
    return None


class _Buffered(asyncio.Protocol):
    """An SSL transport's receiving end: decrypted bytes kept until read, and write flow control."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: Exception | None = None
        self.paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > READ_LIMIT and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()
        self.paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def readable(self) -> None:
        """Until there is something to read, or the end."""
        while not self.buffer and not self.eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def drained(self) -> None:
        """Until the transport takes more (its buffer fell below its low-water mark) or the connection ended."""
        while self.paused:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            finally:
                self._drained = None


class TLSStream(httpcore.AsyncNetworkStream):
    """A TLS connection on an asyncio SSL transport."""

    def __init__(self, protocol: _Buffered, sock: socket.socket) -> None:
        assert protocol.transport is not None
        self._protocol = protocol
        self._transport = protocol.transport
        self._sock = sock

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        p = self._protocol
        with _mapped(httpcore.ReadTimeout, httpcore.ReadError):
            if not p.buffer and not p.eof:
                await _within(timeout, p.readable())
            if not p.buffer:
                if p.error is not None:
                    raise p.error
                return b""
        data = bytes(p.buffer[:max_bytes])
        del p.buffer[:max_bytes]
        if len(p.buffer) <= READ_LIMIT and not self._transport.is_reading() and not self._transport.is_closing():
            self._transport.resume_reading()
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        with _mapped(httpcore.WriteTimeout, httpcore.WriteError):
            if self._transport.is_closing() or (self._protocol.eof and self._protocol.error is not None):
                raise ConnectionResetError(f"the connection is closed ({self._protocol.error or 'closing'})")
            self._transport.write(buffer)
            if self._protocol.paused:
                await _within(timeout, self._protocol.drained())
            if self._protocol.error is not None:
                raise self._protocol.error

    async def aclose(self) -> None:
        self._transport.abort()  # as anyio's non-standard-compatible TLS close: no close_notify wait

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        # Only an https proxy to an https host asks for this, and httpx builds its proxy transports itself.
        raise httpcore.ConnectError("TLS inside TLS (an https proxy to an https host) is not supported")

    def get_extra_info(self, info: str) -> Any:
        return _extra(self._sock, info, self._transport.get_extra_info("ssl_object"))


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Connections opened by the running asyncio loop: TCP_NODELAY set, every address of a name tried in turn
    (Happy Eyeballs, 250 ms apart), the connect timeout over the whole of it."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            sock = await _within(timeout, _connect(loop, host, port, local_address))
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio's transports do
                for option in socket_options or ():
                    sock.setsockopt(*option)
            except BaseException:
                sock.close()
                raise
        return SocketStream(sock)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[SocketOption] | None = None
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
                await _within(timeout, loop.sock_connect(sock, path))
                for option in socket_options or ():
                    sock.setsockopt(*option)
        except BaseException:
            sock.close()
            raise
        return SocketStream(sock)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


AddrInfo = tuple[int, int, int, str, Any]


async def _addresses(loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[AddrInfo]:
    """A literal IP as is (no resolver thread); a name resolved, its families interleaved (RFC 8305)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    first = [i for i in infos if i[0] == infos[0][0]]
    other = [i for i in infos if i[0] != infos[0][0]]
    mixed: list[AddrInfo] = []
    for n in range(max(len(first), len(other))):
        mixed += first[n : n + 1] + other[n : n + 1]
    return mixed


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int, local_address: str | None) -> socket.socket:
    """A connected non-blocking socket to the first of the host's addresses that answers."""
    infos = await _addresses(loop, host, port)
    opened: list[socket.socket] = []

    async def attempt(info: AddrInfo) -> socket.socket:
        family, kind, proto, _, address = info
        sock = socket.socket(family, kind, proto)
        opened.append(sock)
        sock.setblocking(False)
        if local_address:
            sock.bind((local_address, 0))
        await loop.sock_connect(sock, address)
        return sock

    if len(infos) == 1:
        try:
            return await attempt(infos[0])
        except BaseException:
            opened[0].close()
            raise
    attempts: list[Callable[[], Awaitable[socket.socket]]] = [functools.partial(attempt, info) for info in infos]
    winner: socket.socket | None = None
    try:
        winner, _, errors = await staggered_race(attempts, HAPPY_EYEBALLS_DELAY)
    finally:
        for sock in opened:
            if sock is not winner:
                sock.close()
    if winner is None:
        failed = [e for e in errors if e is not None]
        if len({str(e) for e in failed}) == 1:
            raise failed[0]
        raise OSError(f"all connection attempts to {host}:{port} failed: " + "; ".join(str(e) for e in failed))
    return winner


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The certificate store httpx would load per client (a tenth of a second of CPU), loaded once per process."""
    return httpx.create_ssl_context()


def asyncio_transport(verify: ssl.SSLContext | None = None) -> httpx.AsyncHTTPTransport:
    """httpx's own transport (its limits; its TLS settings, or ``verify``) on :class:`AsyncioBackend`.

    httpx 0.28 takes no network backend, so the one place that sets it is here, on its connection pool;
    ``tests/test_netio.py`` fails if an httpx upgrade leaves the backend unused.
    """
    transport = httpx.AsyncHTTPTransport(verify=verify or tls_context())
    pool = getattr(transport, "_pool", None)
    if not isinstance(pool, httpcore.AsyncConnectionPool) or not hasattr(pool, "_network_backend"):
        raise RuntimeError(f"httpx {httpx.__version__}: its transport no longer has the expected httpcore pool")
    pool._network_backend = AsyncioBackend()
    return transport
