"""The emulated Essentia API stream endpoint (``POST /v1/analysis/stream``), with switchable faults.

Results are deterministic: the three models the local backend computes come from real analysis when the
``local`` extra is installed; every other model gets stable values derived from the audio's sha256, shaped
like the service's. The emulator echoes ``loudness_ebur128`` for ``loudness-ebur128``, as the service does.
The audio comes as the request body, or (an empty body and an ``audio-url`` header) is fetched from that URL.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from watcher.emulator.faults import STREAM_FAULTS, Chaos, Ledger, account_of
from watcher.emulator.server import App, Request

STREAM_PATH = "/v1/analysis/stream"
ROUTE = f"POST {STREAM_PATH}"
# Chunked event streams on a kept-alive connection, as an HTTP/1.1 server answers by default; the service's
# documentation is silent on it, so ``AnalysisFaults.close_streams`` serves them with ``Connection: close``.
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
KEYS = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]
CLASSIFIER_LABELS = {
    "danceability": ["danceable", "not_danceable"],
    "voice_instrumental": ["instrumental", "voice"],
    "tonal_atonal": ["tonal", "atonal"],
    "gender": ["female", "male"],
}


@dataclass
class AnalysisFaults:
    """Faults the next requests meet; counters decrease as requests consume them. Thread-safe via ``lock``."""

    status_429: int = 0  # answer this many requests with 429
    retry_after: float = 1.0
    status_500: int = 0  # answer this many requests with 500
    status_401: int = 0
    drop_after: int | None = None  # drop the connection after this many `completed` events (once)
    error_models: set[str] = field(default_factory=set)  # these models get an `error` event instead
    eof_without_finished: int = 0  # end this many streams after the results but before `finished`
    event_delay: float = 0.0  # seconds between events (slow answers)
    read_delay: float = 0.0  # seconds per 64 KiB of request body read (a slow upload link)
    reject_models: set[str] = field(default_factory=set)  # 422 when a request names one of these
    # Both of these answer 200 to an accepted request, so its models count as paid (Emulator.paid).
    not_sse: int = 0  # answer this many streams 200 application/json {"result": "ok"}, no event stream
    keepalive_only: float = 0.0  # the next stream: headers, then only keep-alive comments for this long, then close
    keepalive_interval: float = 0.2  # seconds between those comments
    close_streams: bool = False  # end every event stream with the connection (``Connection: close``)
    # requested model name -> the name (or ``name:version``) its answer carries: another model's answer
    answer_as: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take(self, name: str) -> bool:
        """Consume one unit of a counted fault; True when it applies to this request."""
        with self.lock:
            value = getattr(self, name)
            if value:
                setattr(self, name, value - 1)
                return True
            return False


@dataclass(frozen=True)
class StreamInput:
    """How one request brought its audio: its kind, the ``audio-url`` it named, and the body bytes it carried."""

    kind: Literal["body", "audio-url", "both"]
    url: str | None
    body_bytes: int
    fetch_status: int | None = None  # the CDN's answer to the emulator's GET (None: no fetch, or no answer)


def returned_name(requested: str) -> str:
    """The spelling the service echoes for a requested model name (without version)."""
    name = requested.split(":", 1)[0]
    return {"loudness-ebur128": "loudness_ebur128", "genre_discogs_400": "genre_discogs400"}.get(name, name)


def _fake_results(model: str, digest: bytes) -> dict[str, Any]:
    """Stable, plausibly shaped results for a model, derived from the audio's hash."""
    seed = int.from_bytes(hashlib.sha256(digest + model.encode()).digest()[:8], "big")
    if model == "key":
        return {
            "key": [KEYS[seed % 12]],
            "scale": ["major" if seed & 1 else "minor"],
            "strength": [round(0.5 + (seed % 500) / 1000, 3)],
        }
    if model == "bpm_degara":
        bpm = 80 + seed % 80
        return {"bpm": float(bpm), "beat_positions": [round(i * 60 / bpm, 3) for i in range(8)]}
    if model == "loudness_ebur128":
        lufs = -8.0 - (seed % 160) / 10
        return {
            "integratedLoudness": [lufs],
            "loudnessRange": [round(3 + (seed % 90) / 10, 1)],
            "momentaryLoudness": [[lufs] * 4],
            "shortTermLoudness": [[lufs] * 4],
        }
    labels = CLASSIFIER_LABELS.get(model, [model, f"not_{model}"])
    p = round((seed % 1000) / 1000, 3)
    return {"activations": {labels[0]: p, labels[1]: round(1 - p, 3)}}


def _seconds(path: str) -> float | None:
    """The audio seconds the service bills for a file (its headers' duration), or None when they give none."""
    from watcher.audiofile import sniff_format
    from watcher.media import audio_info

    with open(path, "rb") as fh:
        container = sniff_format(fh.read(64))
    return audio_info(path, container=container).duration


def _local_results(path: str, models: list[str]) -> dict[str, Any] | None:
    """Real results from the local backend for the models it knows, or None without the extra."""
    try:
        from watcher import local
    except ImportError:  # pragma: no cover - the package is always present
        return None
    if not local.available():
        return None
    wanted = [m for m in models if returned_name(m) in local.LOCAL_MODELS]
    if not wanted:
        return {}
    from watcher.local.essentia_models import analyze_file

    return analyze_file(path, wanted)


class AnalysisEmulator:
    """State and faults of the emulated analysis service; ``app`` plugs into an HTTPServerThread.

    ``ledger`` counts ``analyze:<model>`` per model of every stream the service accepted (its body received
    and its models valid), whatever happens to the answer; refusals before any work are not counted.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        use_local: bool = True,
        ledger: Ledger | None = None,
        chaos: Chaos | None = None,
    ) -> None:
        self.api_key = api_key
        self.use_local = use_local
        self.faults = AnalysisFaults()
        self.ledger = ledger or Ledger()
        self.chaos = chaos or Chaos()
        self.app = App()
        self.models_requested: list[list[str]] = []  # the `models` of every accepted request, in order
        self.bytes_received = 0
        self.bytes_arriving = 0  # body bytes of the request being received now
        self.inputs: list[StreamInput] = []  # how every request that got past validation brought its audio
        self._lock = threading.Lock()
        self.app.route("POST", STREAM_PATH, ROUTE, key_check=lambda path, query: not any(query.get("models", [])))(
            self._stream
        )

    def _accept(self, req: Request) -> tuple[list[str], str | None] | None:
        """The models asked for and the chaos drawn for a stream request; None when it was refused (answered)."""
        refusal = self._refusal(req)
        chaos = None
        if refusal is None:
            chaos = self.chaos.draw(ROUTE, STREAM_FAULTS)
            refusal = self._fault(chaos)
        models = [m for m in ",".join(req.query.get("models", [])).split(",") if m]
        rejected = [m for m in models if m.split(":")[0] in self.faults.reject_models]
        if refusal is None and not models:
            refusal = 422, {"detail": "models: field required"}, None
        elif refusal is None and rejected:
            refusal = 422, {"detail": f"unknown model: {rejected[0]}"}, None
        if refusal is not None:
            req.drain()
            req.send_json(*refusal)
            return None
        return models, chaos

    def _refusal(self, req: Request) -> tuple[int, dict[str, Any], dict[str, str] | None] | None:
        """The answer refusing a request before any chaos is drawn: a wrong key, no model, an injected 401."""
        if self.api_key is not None and req.headers.get("Authorization") != f"Bearer {self.api_key}":
            return 401, {"detail": "Invalid API key"}, None
        if not any(req.query.get("models", [])):  # a key check (no model): injected faults are for real calls
            return 422, {"detail": "models: field required"}, None
        if self.faults.take("status_401"):
            return 401, {"detail": "Invalid API key"}, None
        return None

    def _fault(self, chaos: str | None) -> tuple[int, dict[str, Any], dict[str, str] | None] | None:
        """The answer of an injected or chaotic 429, 500 or 503, or None."""
        if self.faults.take("status_429") or chaos == "429":
            retry_after = self.chaos.retry_after if chaos else self.faults.retry_after
            return 429, {"detail": "Too Many Requests"}, {"Retry-After": f"{retry_after:g}"}
        if self.faults.take("status_500") or chaos == "500":
            return 500, {"detail": "Internal Server Error"}, None
        if chaos == "503":
            return 503, {"detail": "Service Unavailable"}, None
        return None

    def _stream(self, req: Request) -> None:
        """POST /v1/analysis/stream: refused as the key, the request and the faults say, else charged and answered."""
        accepted = self._accept(req)
        if accepted is None:
            return
        models, chaos = accepted
        received = self._input(req)
        if received is None:
            return
        digest, path = received
        with self._lock:
            self.models_requested.append(models)
        self.ledger.charge(
            "analysis",
            req.headers.get("Host", ""),
            account_of(req.headers.get("Authorization", "").removeprefix("Bearer ") or None),
            digest.hex(),
            [f"analyze:{spec.split(':', 1)[0]}" for spec in models],
            _seconds(path),
        )
        try:
            if self.faults.take("not_sse"):
                req.send_json(200, {"result": "ok"})
                return
            with self.faults.lock:
                keepalive, self.faults.keepalive_only = self.faults.keepalive_only, 0.0
            if keepalive:
                self._keepalive_only(req, keepalive)
                return
            if chaos == "drop_stream":
                self._answer(req, models, digest, path, drop_early=True)
            else:  # the four-argument call some tests wrap
                self._answer(req, models, digest, path)
        finally:
            os.unlink(path)

    def _sse_headers(self) -> dict[str, str]:
        return {**SSE_HEADERS, "Connection": "close"} if self.faults.close_streams else SSE_HEADERS

    def _keepalive_only(self, req: Request, seconds: float) -> None:
        """Open an event stream and send nothing but comments for ``seconds``, then close it."""
        req.start(200, self._sse_headers())
        deadline = time.monotonic() + seconds
        while True:
            req.write(b": keep-alive\n\n")
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(self.faults.keepalive_interval, left))  # sleep-ok: emulating an idle stream

    def _input(self, req: Request) -> tuple[bytes, str] | None:
        """The request's audio in a temp file, from its body or its ``audio-url``; None when refused (answered)."""
        url = req.headers.get("audio-url")
        digest, path = self._receive(req)
        size = os.path.getsize(path)
        if url is None:
            self._note(StreamInput("body", None, size))
            return digest, path
        os.unlink(path)
        if size:
            self._note(StreamInput("both", url, size))
            req.send_json(400, {"detail": "send the audio as the request body or as audio-url, not both"})
            return None
        try:
            status, digest, path = self._fetch(url, req.headers.get("filename", ""))
        except httpx.HTTPError as exc:
            self._note(StreamInput("audio-url", url, 0))
            req.send_json(422, {"detail": f"could not download the audio from audio-url {url}: {exc}"})
            return None
        self._note(StreamInput("audio-url", url, 0, status))
        if status != 200:
            os.unlink(path)
            req.send_json(422, {"detail": f"could not download the audio from audio-url {url}: HTTP {status}"})
            return None
        return digest, path

    def _note(self, record: StreamInput) -> None:
        with self._lock:
            self.inputs.append(record)

    def _fetch(self, url: str, filename: str) -> tuple[int, bytes, str]:
        """GET ``url`` into a temp file, as the service downloads from a CDN: (status, sha256, path)."""
        sha = hashlib.sha256()
        fd, path = tempfile.mkstemp(prefix="emulator-", suffix=os.path.splitext(filename)[1][:8])
        try:
            with (
                os.fdopen(fd, "wb") as out,
                httpx.stream("GET", url, follow_redirects=True, timeout=10.0) as response,
            ):
                if response.status_code == 200:
                    for chunk in response.iter_bytes(1 << 16):
                        sha.update(chunk)
                        out.write(chunk)
                return response.status_code, sha.digest(), path
        except BaseException:
            os.unlink(path)
            raise

    def _receive(self, req: Request) -> tuple[bytes, str]:
        """Stream the body to a temp file (the emulator, too, never holds audio in memory)."""
        sha = hashlib.sha256()
        suffix = os.path.splitext(req.headers.get("filename", "audio.bin"))[1][:8]
        fd, path = tempfile.mkstemp(prefix="emulator-", suffix=suffix)
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in req.iter_body():
                    if self.faults.read_delay:
                        time.sleep(self.faults.read_delay)  # sleep-ok: emulating a slow link
                    sha.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                    self.bytes_arriving = size
        except BaseException:
            os.unlink(path)
            raise
        finally:
            self.bytes_arriving = 0
        with self._lock:
            self.bytes_received += size
        return sha.digest(), path

    def _answer(self, req: Request, models: list[str], digest: bytes, path: str, *, drop_early: bool = False) -> None:
        """The event stream; ``drop_early`` (chaos) drops the connection after the first result."""
        local = _local_results(path, models) if self.use_local else None
        req.start(200, self._sse_headers())

        def emit(payload: dict[str, Any]) -> None:
            if self.faults.event_delay:
                time.sleep(self.faults.event_delay)  # sleep-ok: emulating a slow service
            req.write(f"data: {json.dumps(payload)}\n\n".encode())

        req.write(b": keep-alive\n\n")
        emit({"status": "started", "total_models": len(models)})
        completed = 0
        for spec in models:
            name = returned_name(spec)
            if name in self.faults.error_models:
                emit({"status": "error", "error": f"model {name} failed to process the audio"})
                continue
            if local is not None and spec in local.get("errors", {}):
                emit({"status": "error", "error": local["errors"][spec]})
                continue
            if local is not None and spec in local.get("results", {}):
                results = local["results"][spec]["results"]
            else:
                results = _fake_results(name, digest)
            version = spec.split(":", 1)[1] if ":" in spec else "1"
            swapped = self.faults.answer_as.get(spec.split(":", 1)[0])
            if swapped is not None:  # another model's answer under its own name
                name, _, other = swapped.partition(":")
                version = other or version
            result = {"model_name": name, "model_version": version, "correlation_id": str(uuid.uuid4())}
            emit({"status": "completed", "result": {**result, "results": results}})
            completed += 1
            with self.faults.lock:
                drop = self.faults.drop_after is not None and completed >= self.faults.drop_after
                if drop:
                    self.faults.drop_after = None
            drop = drop or drop_early
            if drop:
                req.abort_connection()
                return
        if self.faults.take("eof_without_finished"):
            return
        emit({"status": "finished", "total_models": len(models)})
