"""The analysis backends the analyze step can use, and the choice between them (``backend = "auto"``).

``remote`` streams to the analysis service; ``local`` computes key, tempo and loudness with Essentia in a
process pool (the optional ``local`` extra). ``auto`` takes remote when an API key is configured, else local.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from watcher.audiofile import Signature
from watcher.config import AnalysisConfig, account_fingerprint, reveal, service_identity
from watcher.errors import BadInput, ConfigError, FileChanged
from watcher.services.analysis import AnalysisClient, AnalysisReport, ModelResult
from watcher.services.http import AudioSource, HttpPolicy

if TYPE_CHECKING:
    from watcher.services.bandwidth import Bandwidth

log = structlog.get_logger("watcher.analysis")


class RemoteBackend:
    """The analysis service, through :class:`AnalysisClient`."""

    name = "remote"
    paid = True
    final_errors = False

    def __init__(self, cfg: AnalysisConfig, *, bandwidth: Bandwidth | None = None, **client_kwargs: Any) -> None:
        policy = HttpPolicy(
            rate_per_second=cfg.rate_limit, concurrency=cfg.concurrency, read_timeout=cfg.timeout, bandwidth=bandwidth
        )
        self.base_url = cfg.base_url
        self.account = account_fingerprint(cfg.api_key)
        self.key = service_identity("analysis", cfg.base_url, cfg.api_key)
        self.client = AnalysisClient(
            cfg.base_url, reveal(cfg.api_key), policy=policy, event_deadline=cfg.timeout, **client_kwargs
        )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "base_url": self.base_url, "account": self.account}

    async def analyze(
        self,
        audio: AudioSource,
        models: Sequence[str],
        on_result: Callable[[ModelResult], Awaitable[None] | None],
        *,
        audio_url: str | None = None,
    ) -> AnalysisReport:
        return await self.client.analyze(audio, models, on_result, audio_url=audio_url)

    async def aclose(self) -> None:
        await self.client.aclose()


class LocalBackend:
    """Essentia on this machine, in a bounded process pool."""

    name = "local"
    key = "local"
    paid = False
    final_errors = True  # the same file gives the same error again: retrying cannot help

    def __init__(self, cfg: AnalysisConfig) -> None:
        from watcher.local.pool import LocalPool

        self.pool = LocalPool(workers=cfg.local_workers, max_seconds=cfg.local_max_seconds)
        self._version: str | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self._version:
            out["essentia_version"] = self._version
        return out

    async def analyze(
        self,
        audio: AudioSource,
        models: Sequence[str],
        on_result: Callable[[ModelResult], Awaitable[None] | None],
        *,
        audio_url: str | None = None,  # never given: the composition root keeps URL templates for the service
    ) -> AnalysisReport:
        path = getattr(audio, "path", None)
        expected = getattr(audio, "expected", None)
        if path is None or expected is None:
            raise BadInput("the local backend needs a file on disk")
        answer = await self.pool.analyze(str(path), list(models))
        try:
            changed = Signature.of(await asyncio.to_thread(os.stat, path)) != expected
        except FileNotFoundError:
            changed = True
        if changed:
            raise FileChanged("the file changed while it was being analysed; its new revision is analysed anew")
        self._version = answer.get("essentia_version") or self._version
        report = AnalysisReport(requests=1)
        for spec, r in answer.get("results", {}).items():
            result = ModelResult(spec, r["model_name"], r.get("model_version"), None, r["results"])
            report.results[spec] = result
            pending = on_result(result)
            if pending is not None:
                await pending
        report.model_errors.update(answer.get("errors", {}))
        return report

    async def aclose(self) -> None:
        self.pool.close()


Backend = RemoteBackend | LocalBackend


def choose_backend(cfg: AnalysisConfig) -> tuple[str, str]:
    """Which backend runs and why, in words for the start-up log line; ConfigError when none can."""
    from watcher import local

    has_key = cfg.api_key is not None
    if cfg.backend == "remote":
        if not has_key:
            log.warning("analysis.no_key", next="requests go out without a key; the service may refuse them")
        return "remote", 'backend = "remote" in the configuration'
    if cfg.backend == "local":
        if not local.available():
            raise ConfigError(
                'analysis.backend = "local" needs the local extra: pip install "watcher-audio[local]" '
                "(Essentia wheels: CPython 3.11-3.13 on Linux x86_64 and macOS)"
            )
        return "local", 'backend = "local" in the configuration'
    if has_key:
        return "remote", "an API key for the analysis service is configured"
    if local.available():
        return "local", "no API key is configured and the local extra (Essentia) is installed"
    raise ConfigError(
        "no analysis backend can run: set an API key (ESSENTIA_API_KEY, analysis.api_key or analysis.api_key_file) "
        'for the remote service, or install the local extra: pip install "watcher-audio[local]"; '
        "or set analysis.enabled = false"
    )


def make_backend(
    cfg: AnalysisConfig, which: str, *, bandwidth: Bandwidth | None = None, **client_kwargs: Any
) -> Backend:
    """The backend ``which`` names; ``bandwidth`` and ``client_kwargs`` (an observer, a transport) go to the
    remote client."""
    return RemoteBackend(cfg, bandwidth=bandwidth, **client_kwargs) if which == "remote" else LocalBackend(cfg)
