"""Upload throughput: a 1 GiB file sent by watcher's processing client, beside `curl -T` to the same endpoint.

The endpoint is a minimal loopback HTTP server in its own process that reads each request body into one
reused buffer and throws it away, then answers ``{"audio_id": ...}``; so the figure is the client's cost,
not a parser's. Both uploads run in the same run, alternately, and the best of ``--rounds`` is printed, with
the CPU each client spent per GiB (user + system, all threads), a figure that a busy machine disturbs less.
watcher's HTTP session (its TLS certificate store) is made before the clock starts, as a running daemon has it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from watcher.audiofile import UPLOAD_CHUNK, FileBody, signature
from watcher.sending import WireTicket, issue
from watcher.services.http import HttpPolicy
from watcher.services.neuralanalog import NeuralAnalogClient

ANSWER = b'{"audio_id": "discarded"}'


def _serve_connection(conn: socket.socket) -> None:
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    pending = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in pending:
                got = conn.recv(65536)
                if not got:
                    return
                pending += got
            head, _, pending = pending.partition(b"\r\n\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
            }
            if headers.get(b"expect", b"").lower() == b"100-continue":
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            left = int(headers.get(b"content-length", b"0")) - len(pending)
            pending = b""
            while left > 0:
                n = conn.recv_into(view, min(left, len(buf)))
                if not n:
                    return
                left -= n
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(ANSWER)}\r\n\r\n".encode()
                + ANSWER
            )


@contextlib.contextmanager
def discard_server(root: Path) -> Iterator[str]:
    """The discard server in its own process, for as long as the block runs; yields its URL."""
    port_file = root / "port"
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file)])
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline:
                raise SystemExit("the discard server did not start")
            time.sleep(0.05)  # sleep-ok: waits for the server's port, with a deadline
        yield f"http://127.0.0.1:{port_file.read_text()}"
    finally:
        server.terminate()
        server.wait(10)


def serve(port_file: Path) -> None:
    """The discard server: one thread per connection, keep-alive, Content-Length bodies only."""
    sock = socket.create_server(("127.0.0.1", 0))
    port_file.write_text(str(sock.getsockname()[1]))
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=_serve_connection, args=(conn,), daemon=True).start()


async def watcher_upload(url: str, path: Path) -> tuple[float, float]:
    """(seconds, CPU seconds) of one upload by the processing client."""
    policy = HttpPolicy(rate_per_second=100.0, concurrency=1, read_timeout=600.0)
    async with NeuralAnalogClient(url, "bench-key", policy) as client:
        client.http.client  # noqa: B018 - the session a running daemon already has (made at its first request)
        issue(WireTicket(0, ("upload",)))  # the bench stands in for the gate: one ticket for this one upload
        started, cpu = time.perf_counter(), time.process_time()
        body = FileBody(path, signature(path), chunk_size=UPLOAD_CHUNK)  # as the archive pipeline sends it
        audio_id = await client.upload(body)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert audio_id == "discarded", audio_id
    return elapsed, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def curl_upload(url: str, path: Path) -> tuple[float, float]:
    """(seconds, CPU seconds) of one ``curl -T``."""
    started, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(["curl", "-sS", "-o", os.devnull, "-H", "Expect:", "-T", str(path), url + "/from-file"], check=True)
    return time.perf_counter() - started, _children_cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed for the reference figure")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "big.wav"
        block = os.urandom(1 << 20)  # real bytes, not a sparse file: the page cache holds them like a fresh file
        with path.open("wb") as fh:
            for _ in range(args.mib):
                fh.write(block)
        with discard_server(root) as url:
            ours, curls = [], []
            for _ in range(args.rounds):
                curls.append(curl_upload(url, path))
                ours.append(asyncio.run(watcher_upload(url, path)))
    size = args.mib * (1 << 20)
    gib = size / (1 << 30)
    best_ours, best_curl = size / min(t for t, _ in ours) / 1e9, size / min(t for t, _ in curls) / 1e9
    cpu_ours, cpu_curl = min(c for _, c in ours) / gib, min(c for _, c in curls) / gib
    print(f"upload of {args.mib} MiB to a loopback discard server, best of {args.rounds}")
    print(f"watcher (NeuralAnalogClient.upload): {best_ours:.2f} GB/s, {cpu_ours:.2f} CPU s per GiB")
    print(f"curl -T (reference):                 {best_curl:.2f} GB/s, {cpu_curl:.2f} CPU s per GiB")
    print(f"ratio: {best_ours / best_curl:.2f}x")


if __name__ == "__main__":
    main()
