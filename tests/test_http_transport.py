"""The HTTP client against servers that misbehave on the wire: timeouts, refusal, cancellation, kept streams."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import API_KEY, write_tone
from watcher.audiofile import FileBody, signature
from watcher.errors import NotSent, RetryLater
from watcher.services.analysis import AnalysisClient
from watcher.services.http import HttpPolicy, ServiceHTTP

pytestmark = [
    pytest.mark.bill_exempt("the HTTP transport alone, with no store: no ledger to hold the bill against"),
    pytest.mark.usefixtures("gate_stand_in"),
]

QUICK = HttpPolicy(read_timeout=0.5, connect_timeout=2.0, attempts=1)


class RawServer:
    """A loopback TCP server whose connections a test steers: each is handed to ``handle`` in its own thread."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.handle = handle
        self.accepted = 0
        self.closed_by_client = 0
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            self.handle(conn)

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.sock.close()
        self._acceptor.join(5)
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def raw_server() -> Iterator[Callable[[Callable[[socket.socket], None]], RawServer]]:
    made: list[RawServer] = []

    def make(handle: Callable[[socket.socket], None]) -> RawServer:
        made.append(RawServer(handle))
        return made[-1]

    yield make
    for server in made:
        server.close()


def _head(conn: socket.socket) -> tuple[bytes, bytes]:
    """The request line and headers, and whatever body bytes came with them."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = conn.recv(65536)
        if not got:
            return b"", b""
        data += got
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _answer(conn: socket.socket, body: bytes = b"ok") -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def _hold(server_stop: threading.Event, conn: socket.socket) -> None:
    """Keep a connection open without reading or answering, until the test ends."""
    server_stop.wait(30)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_a_server_that_never_answers_is_a_read_timeout(raw_server):
    """Accepted, request read, no answer: the read timeout fires and becomes RetryLater (ReadTimeout)."""

    def handle(conn: socket.socket) -> None:
        _head(conn)
        server.stop.wait(10)

    server = raw_server(handle)

    async def go() -> None:
        http = ServiceHTTP("svc", server.url, policy=QUICK)
        try:
            await http.request("GET", "/", retry=False)
        finally:
            await http.aclose()

    with pytest.raises(RetryLater, match=r"timed out \(ReadTimeout\)") as err:
        run(go())
    assert isinstance(err.value.__cause__, httpx.ReadTimeout)


def test_a_server_that_never_reads_the_body_is_a_write_timeout(raw_server):
    """A body far larger than the socket buffers, to a server that reads nothing: the write timeout fires."""
    server = raw_server(lambda conn: _hold(server.stop, conn))

    left: list[int] = []

    async def go() -> None:
        http = ServiceHTTP("svc", server.url, policy=QUICK)
        try:
            await http.request("POST", "/", retry=False, content=bytes(64 << 20))
        finally:
            left.append(len(http.client._transport._pool.connections))  # type: ignore[attr-defined]
            await http.aclose()

    with pytest.raises(RetryLater, match=r"timed out \(WriteTimeout\)") as err:
        run(go())
    assert isinstance(err.value.__cause__, httpx.WriteTimeout)
    assert left == [0]  # the half-written connection was dropped, not kept for reuse


def test_connection_refused_is_not_sent():
    """Nothing listening: NotSent naming ConnectError, as with httpx's default backend."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def go() -> None:
        http = ServiceHTTP("svc", f"http://127.0.0.1:{port}", policy=QUICK)
        try:
            await http.request("GET", "/", retry=False)
        finally:
            await http.aclose()

    with pytest.raises(NotSent, match="could not be reached: ConnectError") as err:
        run(go())
    assert isinstance(err.value.__cause__, httpx.ConnectError)


def test_a_write_cancelled_midway_leaves_the_client_usable(raw_server):
    """A request cancelled while its body is being written: that connection is closed, never reused; the next
    request on the same client opens a fresh one and gets its answer."""

    holding = threading.Event()

    def handle(conn: socket.socket) -> None:
        head, _ = _head(conn)
        if head.startswith(b"POST /hold"):
            holding.set()
            _hold(server.stop, conn)
        elif head:
            _answer(conn, b"fresh")

    server = raw_server(handle)

    async def go() -> bytes:
        http = ServiceHTTP("svc", server.url, policy=HttpPolicy(read_timeout=30, attempts=1))
        try:
            upload = asyncio.ensure_future(http.request("POST", "/hold", retry=False, content=bytes(64 << 20)))
            # its headers reached the server, which reads no further: the client is stuck in the body's write
            assert await asyncio.get_running_loop().run_in_executor(None, holding.wait, 10)
            assert not upload.done()
            upload.cancel()
            with pytest.raises(asyncio.CancelledError):
                await upload
            assert http.client._transport._pool.connections == []  # type: ignore[attr-defined]
            response = await http.request("GET", "/next", retry=False)
            return response.content
        finally:
            await http.aclose()

    assert run(go()) == b"fresh"
    assert server.accepted == 2  # the cancelled connection was not reused


@pytest.mark.parametrize("close_streams", [False, True])
def test_event_streams_with_and_without_keep_alive(emulator, tmp_path, close_streams):
    """Analysis works whether the service keeps the connection after a stream or closes it; kept, one
    connection serves every request."""
    emulator.analysis.faults.close_streams = close_streams
    audio = write_tone(tmp_path / "a.wav", 0.25)
    pooled: list[list[object]] = []  # the pool's connections after each analysis

    async def go() -> list[set[str]]:
        client = AnalysisClient(emulator.url, API_KEY, policy=QUICK)
        try:
            reports = []
            for _ in range(3):
                report = await client.analyze(FileBody(audio, signature(audio)), ["key", "bpm_degara"], lambda r: None)
                reports.append(set(report.results))
                pooled.append(list(client.http.client._transport._pool.connections))  # type: ignore[attr-defined]
            return reports
        finally:
            await client.aclose()

    assert run(go()) == [{"key", "bpm_degara"}] * 3
    if close_streams:
        assert pooled == [[], [], []]
    else:
        assert len(pooled[0]) == 1 and pooled == [pooled[0]] * 3  # the same connection each time


def test_a_stream_left_open_after_finished_is_closed_not_waited_for(raw_server, tmp_path):
    """A service that keeps the stream open after `finished`: the report is complete at once, and the connection
    is dropped after the short wait for the stream's end rather than kept."""

    def handle(conn: socket.socket) -> None:
        head, body = _head(conn)
        length = int(
            next(v for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length")
        )
        while len(body) < length:
            body += conn.recv(65536)
        events = [
            b'{"status": "started", "total_models": 1}',
            b'{"status": "completed", "result": {"model_name": "key", "results": {}}}',
            b'{"status": "finished", "total_models": 1}',
        ]
        payload = b"".join(b"data: %s\n\n" % e for e in events)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n"
            % (len(payload), payload)
        )
        server.stop.wait(30)  # no terminating chunk: the stream stays open

    server = raw_server(handle)
    audio = write_tone(tmp_path / "a.wav", 0.25)
    left: list[int] = []

    async def go() -> set[str]:
        client = AnalysisClient(server.url, API_KEY, policy=QUICK)
        try:
            report = await client.analyze(FileBody(audio, signature(audio)), ["key"], lambda r: None)
            left.append(len(client.http.client._transport._pool.connections))  # type: ignore[attr-defined]
            return set(report.results)
        finally:
            await client.aclose()

    assert run(go()) == {"key"}
    assert left == [0]
