"""Loopback emulators of the two services, for tests, demos and dry runs (`watcher emulate`)."""

from __future__ import annotations

from collections import Counter
from types import TracebackType

from watcher.emulator.analysis import AnalysisEmulator, AnalysisFaults, StreamInput
from watcher.emulator.faults import Chaos, Charge, Ledger, RateLimit
from watcher.emulator.neuralanalog import NeuralAnalogEmulator, ProcessingFaults
from watcher.emulator.server import App, HTTPServerThread, RecordedRequest, Request

__all__ = [
    "AnalysisEmulator",
    "AnalysisFaults",
    "App",
    "Chaos",
    "Charge",
    "Emulator",
    "HTTPServerThread",
    "Ledger",
    "NeuralAnalogEmulator",
    "ProcessingFaults",
    "RateLimit",
    "RecordedRequest",
    "Request",
    "StreamInput",
]


class Emulator:
    """Both services' APIs on one loopback address (``url``), and the processing service's storage host
    on a second one (``storage``), as signed URLs point to another host.

    ``bill()`` is what the two services could bill, per account (``paid()`` counts it per content and operation);
    ``chaos()`` turns on seeded random faults; ``limit()``
    enforces a rate limit per API key. ``processing.faults.polls_needed`` set very high keeps jobs in progress.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        analysis_key: str | None = None,
        processing_key: str | None = None,
        use_local: bool = True,
    ) -> None:
        self.ledger = Ledger()
        self._chaos = Chaos()
        self.analysis = AnalysisEmulator(
            api_key=analysis_key, use_local=use_local, ledger=self.ledger, chaos=self._chaos
        )
        self.processing = NeuralAnalogEmulator(api_key=processing_key, ledger=self.ledger, chaos=self._chaos)
        self.api = HTTPServerThread([self.analysis.app, self.processing.app], host, port)
        self.storage = HTTPServerThread([self.processing.storage_app], host, 0)
        self.processing.storage_url = self.storage.url
        self.url = self.api.url

    def paid(self) -> Counter[tuple[str, str]]:
        """``(sha256 hex of the audio content, operation) -> requests accepted that could be billed``.

        Operations: ``analyze:<model>`` per model of an accepted stream (version stripped), ``upload``,
        ``restore``, ``master``, ``stems``. A request refused before any work (an injected 429, 5xx or 4xx)
        is not counted; one whose work was done but whose answer was lost is.
        """
        return self.ledger.snapshot()

    def bill(self, account: str | None = None) -> list[Charge]:
        """The bill: every request the services accepted and could bill, in order (of one ``account``: see
        ``faults.account_of``), with its content, operations and audio seconds."""
        return self.ledger.charges(account)

    def chaos(self, seed: int, rate: float) -> None:
        """From now on each request meets a random fault with probability ``rate`` (0 turns chaos off).

        Faults: 429 with Retry-After, 500, 503; an analysis stream dropped after its first result; a paid
        POST whose work is done and whose answer is lost; 500 or 503 from the storage host.
        """
        self._chaos.configure(seed, rate)

    def limit(self, per_second: float | None, *, burst: float | None = None) -> tuple[RateLimit, RateLimit] | None:
        """Each service refuses more than ``per_second`` requests per API key with 429 and Retry-After (a token
        bucket of ``burst`` requests, one second's worth by default); None lifts the limits.

        Returns the (analysis, processing) limits, whose ``admitted`` and ``refused`` count requests per route.
        """
        if per_second is None:
            self.analysis.app.limit = self.processing.app.limit = None
            return None
        analysis = RateLimit(per_second, key_header="Authorization", burst=burst)
        processing = RateLimit(per_second, key_header="X-API-Key", burst=burst)
        self.analysis.app.limit, self.processing.app.limit = analysis, processing
        return analysis, processing

    @property
    def injected(self) -> list[tuple[str, str]]:
        """``(route, fault)`` for every fault chaos injected, in order."""
        return self._chaos.injected

    def reset(self) -> None:
        """Forget objects, faults, chaos, paid requests and recorded requests (servers keep running)."""
        self.analysis.faults = AnalysisFaults()
        self.analysis.models_requested.clear()
        self.analysis.inputs.clear()
        self.processing.reset()  # clears the shared ledger and chaos too
        self.api.reset()
        self.storage.reset()
        self.limit(None)

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
