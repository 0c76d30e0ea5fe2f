"""The emulated storage host's one route: a signed URL's download, with its faults (expired URLs, 500s,
truncated bodies) and chaos."""

from __future__ import annotations

import time

from watcher.emulator.faults import STORAGE_FAULTS, Chaos
from watcher.emulator.processing_state import ProcessingState
from watcher.emulator.server import Request


def serve_signed(req: Request, state: ProcessingState, chaos: Chaos) -> None:
    """A signed URL's download: the file, or the storage host's XML error for an expired or unknown URL, an
    injected 500 or a chaotic status; ``truncate_downloads`` cuts the body in half and drops the connection."""
    drawn = chaos.draw("GET /signed", STORAGE_FAULTS)
    if drawn is not None:
        req.send_bytes(int(drawn), f"<Error><Code>Emulated{drawn}</Code></Error>".encode(), "application/xml")
        return
    with state.lock:
        path, expires = state.signed.get(req.param("token"), (None, None))
    f = state.faults
    if path is None or (expires is not None and time.monotonic() >= expires) or f.take_count("expired_urls"):
        body = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
        req.send_bytes(f.expired_status if path is not None else 403, body, "application/xml")
        return
    if f.take_count("storage_500"):
        req.send_bytes(500, b"<Error><Code>InternalError</Code></Error>", "application/xml")
        return
    size = path.stat().st_size
    truncate = f.take_count("truncate_downloads")
    req.start(200, {"Content-Type": "application/octet-stream", "Content-Length": str(size)})
    with path.open("rb") as fh:
        if truncate:
            req.write(fh.read(size // 2))
            req.abort_connection()
            return
        while chunk := fh.read(1 << 20):
            req.write(chunk)
