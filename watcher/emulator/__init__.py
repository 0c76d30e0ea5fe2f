"""Loopback emulators of the two services, for tests, demos and dry runs (`watcher emulate`)."""

from __future__ import annotations

from types import TracebackType

from watcher.emulator.analysis import AnalysisEmulator, AnalysisFaults
from watcher.emulator.neuralanalog import NeuralAnalogEmulator, ProcessingFaults
from watcher.emulator.server import App, HTTPServerThread, RecordedRequest, Request

__all__ = [
    "AnalysisEmulator",
    "AnalysisFaults",
    "App",
    "Emulator",
    "HTTPServerThread",
    "NeuralAnalogEmulator",
    "ProcessingFaults",
    "RecordedRequest",
    "Request",
]


class Emulator:
    """Both services' APIs on one loopback address (``url``), and the processing service's storage host
    on a second one (``storage``), as signed URLs point to another host."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        analysis_key: str | None = None,
        processing_key: str | None = None,
        use_local: bool = True,
    ) -> None:
        self.analysis = AnalysisEmulator(api_key=analysis_key, use_local=use_local)
        self.processing = NeuralAnalogEmulator(api_key=processing_key)
        self.api = HTTPServerThread([self.analysis.app, self.processing.app], host, port)
        self.storage = HTTPServerThread([self.processing.storage_app], host, 0)
        self.processing.storage_url = self.storage.url
        self.url = self.api.url

    def start(self) -> Emulator:
        self.api.start()
        self.storage.start()
        return self

    def stop(self) -> None:
        self.api.stop()
        self.storage.stop()
        self.processing.close()

    def serve_forever(self) -> None:
        self.storage.start()
        try:
            self.api.serve_forever()
        finally:
            self.storage.stop()
            self.processing.close()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
