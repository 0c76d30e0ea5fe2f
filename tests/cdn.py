"""A static file server on 127.0.0.1 standing in for a CDN: serves folders under URL prefixes, records every GET.

Request paths are percent-decoded to bytes, so a URL names a file by its exact bytes (a name that is not valid
UTF-8 included), as a CDN mirroring the watched folders would.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote_to_bytes


class StaticServer:
    """Serves ``mounts`` (URL prefix -> folder) over HTTP; ``requests`` holds each raw request target received."""

    def __init__(self, mounts: dict[str, Path]) -> None:
        self.mounts = {prefix.rstrip("/"): os.fsencode(root) for prefix, root in mounts.items()}
        self.requests: list[str] = []  # the raw request targets (path and query) in order
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server.lock:
                    server.requests.append(self.path)
                found = server.locate(self.path)
                if found is None or not os.path.isfile(found):
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(os.path.getsize(found)))
                self.end_headers()
                with open(found, "rb") as fh:
                    shutil.copyfileobj(fh, self.wfile)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def locate(self, target: str) -> bytes | None:
        """The file a request target names, or None when it falls under no mount (or leaves it)."""
        raw = unquote_to_bytes(target.partition("?")[0])
        for prefix, root in self.mounts.items():
            head = prefix.encode() + b"/"
            if raw.startswith(head):
                rest = raw[len(head) :]
                if b"\0" in rest or b".." in rest.split(b"/"):
                    return None
                return os.path.join(root, rest)
        return None

    def paths(self) -> Counter[str]:
        """How often each path (without its query) was fetched."""
        with self.lock:
            return Counter(t.partition("?")[0] for t in self.requests)

    def start(self) -> StaticServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(10)

    def __enter__(self) -> StaticServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
