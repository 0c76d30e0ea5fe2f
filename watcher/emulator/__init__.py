"""Loopback emulators of the two services, for tests, demos and dry runs (`watcher emulate`)."""

from __future__ import annotations

from types import TracebackType

from watcher.emulator.analysis import AnalysisEmulator, AnalysisFaults
from watcher.emulator.server import App, HTTPServerThread, RecordedRequest, Request

__all__ = [
    "AnalysisEmulator",
    "AnalysisFaults",
    "App",
    "Emulator",
    "HTTPServerThread",
    "RecordedRequest",
    "Request",
]


class Emulator:
    """Both services on one loopback address (``url``)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        analysis_key: str | None = None,
        use_local: bool = True,
    ) -> None:
        self.analysis = AnalysisEmulator(api_key=analysis_key, use_local=use_local)
        self.api = HTTPServerThread([self.analysis.app], host, port)
        self.url = self.api.url

    def start(self) -> Emulator:
        self.api.start()
        return self

    def stop(self) -> None:
        self.api.stop()

    def serve_forever(self) -> None:
        self.api.serve_forever()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
