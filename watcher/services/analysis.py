"""Client of the analysis service's stream endpoint (Essentia API, server-sent events).

The audio is streamed from disk as the raw request body, or (``audio_url``) the request has an empty body and an
``audio-url`` header naming where the service fetches it: one or the other, never both. Each ``completed`` result
is handed to the caller the moment it arrives (so it can be persisted). One call is one request, sent on the
gate's ticket (watcher.sending): when a stream errs or ends before ``finished``, the error goes back to the
caller, whose next take asks only for the models still missing. There is no retry loop here.

Answers are matched to the asked models by one rule (:func:`model_key`): the name lower-cased with ``-`` and
``_`` removed, the version compared exactly when both sides give one. An answer that matches no model still
pending is not a result: it goes to the report's errors.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from watcher.config.audio_url import without_query
from watcher.errors import Malformed, Rejected, RetryLater, WatcherError
from watcher.sending import whole_body
from watcher.services.http import AudioSource, HttpPolicy, RequestObserver, ServiceHTTP
from watcher.services.httperrors import translate_transport_error

if TYPE_CHECKING:  # imported at the first request (see watcher.services.http)
    import httpx

log = structlog.get_logger("watcher.analysis")
SERVICE = "analysis service"
STREAM_PATH = "/v1/analysis/stream"
# After `finished`, how long the stream's end is waited for: read, it leaves the connection free for the next
# request (no new TCP connection); a service that keeps the stream open longer just has it closed.
STREAM_END_WAIT = 0.1


@dataclass(frozen=True)
class ModelResult:
    """One model's answer: what was requested, and the name, version and results the service returned."""

    requested: str
    model_name: str
    model_version: str | None
    correlation_id: str | None
    results: Any


@dataclass
class AnalysisReport:
    """What an analysis produced: results per requested model, error messages, and whether all answered."""

    results: dict[str, ModelResult] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    model_errors: dict[str, str] = field(default_factory=dict)  # errors that name their model (local backend)
    requests: int = 0

    def missing(self, models: Sequence[str]) -> list[str]:
        return [m for m in models if m not in self.results]


OnResult = Callable[[ModelResult], Awaitable[None] | None]


def model_key(name: str) -> str:
    """A model name as answers are matched by: lower-case, ``-`` and ``_`` removed, no version.

    ``loudness-ebur128`` ~ ``loudness_ebur128``, ``genre_discogs_400`` ~ ``genre_discogs400``; ``mood_happy`` and
    ``mood_sad``, or ``x-1`` and ``x-2``, stay apart: nothing is matched by likeness.
    """
    return name.split(":", 1)[0].lower().replace("-", "").replace("_", "")


def match_requested(model_name: str, model_version: str | None, candidates: Sequence[str]) -> str | None:
    """The one requested spec (``name`` or ``name:version``) a returned model answers, or None.

    Names are equal under :func:`model_key`; a version asked for must equal the version returned (when the
    answer gives one). Two candidates that both match make the answer ambiguous: None.
    """
    wanted = model_key(model_name)
    found = []
    for spec in candidates:
        name, _, version = spec.partition(":")
        if model_key(name) != wanted:
            continue
        if version and model_version is not None and version.strip() != model_version.strip():
            continue
        found.append(spec)
    return found[0] if len(found) == 1 else None


class AnalysisClient:
    """Typed client for ``POST /v1/analysis/stream``; knows nothing of folders or the store."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        policy: HttpPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        event_deadline: float | None = None,
        observer: RequestObserver | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = ServiceHTTP(
            SERVICE,
            base_url,
            headers=headers,
            policy=policy,
            transport=transport,
            observer=observer,
            paid_routes={("POST", STREAM_PATH)},
        )
        self.event_deadline = event_deadline or self.http.policy.read_timeout

    async def aclose(self) -> None:
        await self.http.aclose()

    async def check(self) -> str:
        """One cheap authenticated call: an empty request, with no audio and no model, so nothing is billed."""
        return await self.http.probe(
            "POST", STREAM_PATH, params={"models": ""}, content=b"", headers={"Accept": "text/event-stream"}
        )

    async def analyze(
        self, audio: AudioSource, models: Sequence[str], on_result: OnResult, *, audio_url: str | None = None
    ) -> AnalysisReport:
        """Analyse ``audio`` with ``models`` in one request, sent on the gate's ticket for exactly these models.

        With ``audio_url`` the service fetches the audio from there and no byte of ``audio`` is sent; its name
        still goes in the ``filename`` header.

        Returns when the stream finished (some models may have answered with an error: the report says why).
        Raises RetryLater when the stream broke or ended before ``finished`` (every result received was handed
        to ``on_result`` first): asking again for the rest is a new take at the gate, never a loop here.
        NeedsUser or BadInput when retrying cannot help.
        """
        report = AnalysisReport()
        finished = await self._attempt(audio, list(models), report, on_result, audio_url)
        still = report.missing(models)
        if still and not finished:
            raise RetryLater(
                f"the stream ended before `finished` with {len(still)} model(s) unanswered: {', '.join(still)}"
            )
        return report

    async def _attempt(
        self,
        audio: AudioSource,
        models: list[str],
        report: AnalysisReport,
        on_result: OnResult,
        audio_url: str | None = None,
    ) -> bool:
        """One request; returns True when ``finished`` arrived."""
        headers = {
            "filename": _header_safe(audio.name),
            "Accept": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
        content: bytes | AsyncIterator[bytes]
        if audio_url is None:
            headers |= {"Content-Type": "application/octet-stream", "Content-Length": str(audio.size)}
            content = whole_body(audio.chunks(), audio.size)  # a stream cut before its last byte is not sent
        else:  # an empty body (Content-Length: 0): the service fetches the audio itself
            headers["audio-url"] = audio_url
            content = b""
        report.requests += 1
        shown = None if audio_url is None else without_query(audio_url)
        log.debug("analysis.request", models=models, attempt=report.requests, **({"audio_url": shown} if shown else {}))
        try:
            async with self.http.stream(
                "POST",
                STREAM_PATH,
                params={"models": ",".join(models)},
                headers=headers,
                content=content,
                covers=[f"analyze:{m}" for m in models],
            ) as response:
                return await self._read_response(response, models, report, on_result)
        except WatcherError as exc:
            if audio_url is None or shown is None:
                raise
            _hide_query(exc, audio_url, shown)  # the service may quote the URL: its query may hold a token
            if type(exc) is Rejected:  # most likely the service could not fetch the URL: say where it looked
                where = "" if shown in str(exc) else f" {shown}"
                hint = f"; check that the CDN serves this file at its audio-url{where}"
                raise Rejected(f"{exc}{hint}", status=exc.status) from exc
            raise

    async def _read_response(
        self, response: httpx.Response, models: list[str], report: AnalysisReport, on_result: OnResult
    ) -> bool:
        """The answer to one request: an event stream read to its end, or Malformed."""
        import httpx
        from httpx_sse import SSEError

        content_type = response.headers.get("content-type", "")
        if "text/event-stream" not in content_type:
            body = (await response.aread())[:300].decode("utf-8", "replace")
            raise Malformed(f"{SERVICE} answered {response.status_code} without an event stream: {body!r}")
        try:
            return await self._read_events(response, models, report, on_result)
        except SSEError as exc:
            raise Malformed(f"{SERVICE} sent a malformed event stream: {exc}") from exc
        except (httpx.HTTPError, httpx.StreamError) as exc:
            raise translate_transport_error(exc, SERVICE) from exc

    async def _read_events(
        self, response: httpx.Response, models: list[str], report: AnalysisReport, on_result: OnResult
    ) -> bool:
        """Dispatch events until ``finished`` (True) or the end of the stream (False).

        Keep-alive comments do not count as events: a stream that sends nothing else for ``event_deadline``
        seconds is broken off (RetryLater), and the next attempt asks again for the models still missing.
        """
        loop = asyncio.get_running_loop()
        deadline = self.event_deadline
        try:
            async with asyncio.timeout(deadline) as timer:
                return await self._dispatch(response, models, report, on_result, timer, loop)
        except TimeoutError:
            raise RetryLater(
                f"{SERVICE} sent no event for {deadline:g} s (only keep-alives); breaking the stream off"
            ) from None

    async def _dispatch(
        self,
        response: httpx.Response,
        models: list[str],
        report: AnalysisReport,
        on_result: OnResult,
        timer: asyncio.Timeout,
        loop: asyncio.AbstractEventLoop,
    ) -> bool:
        from httpx_sse import EventSource

        pending = list(models)
        events = EventSource(response).aiter_sse()
        async for sse in events:
            timer.reschedule(loop.time() + self.event_deadline)
            if not sse.data:
                continue
            try:
                event = json.loads(sse.data)
            except ValueError:
                log.warning("analysis.bad_event", data=sse.data[:200])
                continue
            status = event.get("status") if isinstance(event, dict) else None
            if status == "completed":
                result = event.get("result") or {}
                name = str(result.get("model_name", ""))
                version = _opt_str(result.get("model_version"))
                spec = match_requested(name, version, pending)
                if spec is None:  # another model's answer (or a second one) is never stored as an asked one
                    shown = f"{name}:{version}" if version else name
                    asked = ", ".join(pending)
                    message = f"an answer for model {shown!r}, which matches no model still asked ({asked})"
                    report.errors.append(message)
                    log.warning("analysis.unexpected_model", model_name=name, version=version, requested=pending)
                    continue
                pending.remove(spec)
                answer = ModelResult(
                    requested=spec,
                    model_name=name,
                    model_version=version,
                    correlation_id=_opt_str(result.get("correlation_id")),
                    results=result.get("results"),
                )
                report.results[spec] = answer
                told = on_result(answer)
                if inspect.isawaitable(told):
                    await told
            elif status == "error":
                message = str(event.get("error") or "unspecified error")
                report.errors.append(message)
                log.warning("analysis.model_error", error=message)
            elif status == "finished":
                await _read_to_end(events)
                return True
            elif status != "started":
                log.debug("analysis.unknown_event", status=status)
        return False


async def _read_to_end(events: AsyncIterator[Any]) -> None:
    """The rest of a finished stream, if it ends within STREAM_END_WAIT (anything after `finished` is ignored)."""
    import httpx
    from httpx_sse import SSEError

    try:
        async with asyncio.timeout(STREAM_END_WAIT):
            async for _ in events:
                pass
    except (TimeoutError, httpx.HTTPError, httpx.StreamError, SSEError):
        pass  # the connection is closed instead of kept: the results are in already


def _hide_query(exc: Exception, url: str, shown: str) -> None:
    """Remove ``url``'s query from ``exc``'s message wherever the service echoed it (in place)."""
    query = url.partition("?")[2]
    if query:
        exc.args = tuple(
            a.replace(url, shown).replace(query, "…") if isinstance(a, str) else a for a in exc.args
        )


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _header_safe(name: str) -> str:
    """HTTP headers carry latin-1 at best: a name that is not printable ASCII goes percent-encoded from its
    exact bytes (any name the OS gives, valid UTF-8 or not, control characters included)."""
    from watcher.names import header_value

    return header_value(name)
