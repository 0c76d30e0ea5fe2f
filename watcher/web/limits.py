"""What a connection to the page may cost: a cap on open connections (the rest are closed at once, so no local
user can starve the daemon of file handles), a deadline for a request's headers (uvicorn has none: an idle
or trickling connection would stay open for ever), and a quiet uvicorn log (no line per refused request)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_SECONDS = 10.0  # from a connection's start (or its last answer) to the end of the next request's headers
KEEP_ALIVE_SECONDS = 5  # an idle kept-alive connection is closed after this (uvicorn's timeout_keep_alive)
MAX_CONNECTIONS = 64  # at most; fewer when the open-files limit is low (see connection_cap)
MAX_HEADER_BYTES = 16 * 1024  # uvicorn's h11_max_incomplete_event_size: the request line and headers
BACKLOG = 128  # connections the kernel queues before the page accepts them (they cost no file handle there)
FILE_SHARE = 4  # the page's connections take at most 1/FILE_SHARE of the open-files limit; the rest is for files


def connection_cap(open_files_limit: int) -> int:
    """How many connections the page keeps open at once under ``open_files_limit``, leaving the larger share
    of file handles to file work (folders, audio, sidecars, the store)."""
    return max(4, min(MAX_CONNECTIONS, open_files_limit // FILE_SHARE))


class Gate:
    """Counts the page's connections, from the moment they are accepted (asyncio accepts a burst before any
    protocol sees one) until they close; :meth:`full` says whether the cap is reached."""

    PENDING_SECONDS = 5.0  # an accepted socket whose protocol never started stops counting after this

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.connections: set[Any] = set()  # uvicorn's own set of open connections, once its server exists
        self._pending: deque[float] = deque()  # when each accepted, not yet started, connection was accepted

    def full(self) -> bool:
        now = time.monotonic()
        while self._pending and now - self._pending[0] > self.PENDING_SECONDS:
            self._pending.popleft()
        return len(self.connections) + len(self._pending) >= self.cap

    def accepted(self) -> None:
        self._pending.append(time.monotonic())

    def started(self) -> None:
        if self._pending:
            self._pending.popleft()


class GatedSocket(socket.socket):
    """A listening socket whose ``accept`` (what asyncio's server calls) closes, at once and without a word,
    every connection beyond the gate's cap: over the cap a connection costs a file handle for a moment only."""

    gate: Gate

    def accept(self) -> tuple[socket.socket, Any]:
        while True:  # until the kernel's queue is empty: then BlockingIOError ends asyncio's accept loop
            conn, address = super().accept()
            if not self.gate.full():
                self.gate.accepted()
                # asyncio sets TCP_NODELAY only on sockets made with proto=IPPROTO_TCP: without it an answer's
                # body waits for the client's delayed ACK of its headers (about 40 ms per request)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return conn, address
            conn.close()


def listen(host: str, port: int, gate: Gate) -> GatedSocket:
    """A non-blocking listening socket on ``host:port`` behind ``gate`` (OSError when the port is taken)."""
    sock = GatedSocket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.gate = gate
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def guarded_protocol(gate: Gate, header_seconds: float | None = None) -> type[H11Protocol]:
    """uvicorn's h11 protocol, counted by ``gate``, with the header deadline (default :data:`HEADER_SECONDS`)."""
    deadline = HEADER_SECONDS if header_seconds is None else header_seconds

    class Guarded(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _waiting_from: Any = None  # the request cycle current when the deadline was armed

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            gate.started()
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._waiting_from = self.cycle
            self._deadline = self.loop.call_later(deadline, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.abort()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._deadline is not None and self.cycle is not self._waiting_from:
                self._disarm()  # a new request's headers are in

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the next request's headers must come in time too

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Guarded


_PER_REQUEST = (
    "Invalid HTTP request received.",
    "Unsupported upgrade request.",
    "No supported WebSocket library detected",
    "Exceeded concurrency limit.",
)


class _QuietUvicorn(logging.Filter):
    """Drops uvicorn's warnings about single requests (anyone could fill the log with them); keeps the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_PER_REQUEST)


_QUIET = _QuietUvicorn()


def quiet_uvicorn_log() -> None:
    """uvicorn's own log at warning, without its per-request lines."""
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)
