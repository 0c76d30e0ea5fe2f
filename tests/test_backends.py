"""Analysis backends and the analyze pipeline's step, alone: where work is done, and what is asked for."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from tests.conftest import write_tone
from watcher.audiofile import signature
from watcher.backends import RemoteBackend
from watcher.config import AnalysisConfig, SidecarConfig
from watcher.pipelines.analyze import AnalyzePipeline
from watcher.pipelines.base import StepResult
from watcher.services.analysis import AnalysisReport, ModelResult
from watcher.store import Store
from watcher.store.aio import AsyncStore


def test_results_are_keyed_by_endpoint_and_account():
    """Two endpoints, or two keys, are two places of work; the key itself is never in the identity."""
    a = RemoteBackend(AnalysisConfig(base_url="https://a.example", api_key=SecretStr("key-aaaa-1111")))
    b = RemoteBackend(AnalysisConfig(base_url="https://b.example", api_key=SecretStr("key-aaaa-1111")))
    c = RemoteBackend(AnalysisConfig(base_url="https://a.example", api_key=SecretStr("key-bbbb-2222")))
    keys = {a.key, b.key, c.key}
    assert len(keys) == 3 and all("key-" not in k for k in keys)
    assert a.key.startswith("analysis https://a.example account:")
    for backend in (a, b, c):
        asyncio.run(backend.aclose())


class Counting:
    """An in-process backend that answers every model and counts what it was asked (a stand-in for a service)."""

    name = "counting"
    key = "counting"
    paid = False
    final_errors = False

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    async def analyze(
        self, audio: Any, models: Sequence[str], on_result: Callable[[ModelResult], Awaitable[None] | None]
    ) -> AnalysisReport:
        self.asked.append(list(models))
        report = AnalysisReport()
        for spec in models:
            result = self.answer(spec)
            report.results[spec] = result
            told = on_result(result)
            if told is not None:
                await told
        return report

    def answer(self, spec: str) -> ModelResult:
        return ModelResult(spec, spec.split(":")[0], "1", None, {"value": spec})


def analyse_one(store: Store, backend: Counting, audio: Path, models: list[str]) -> None:
    """Register ``audio`` as a new revision, run its analysis step to done with ``backend`` and release the job."""
    sig = signature(audio)
    store.register_revision(
        folder=str(audio.parent),
        path=str(audio),
        rel_path=audio.name,
        size=sig.size,
        mtime_ns=sig.mtime_ns,
        inode=sig.inode,
        jobs=[("analyze", "analyze")],
    )
    job = store.claim("analyze", "me")
    assert job is not None

    async def go() -> StepResult:
        aio = AsyncStore(store)
        try:
            return await AnalyzePipeline(aio, backend, models=models, sidecar=SidecarConfig()).run(job)
        finally:
            await aio.aclose(close_store=False)

    result = asyncio.run(go())
    assert result.state == "done"
    store.release(job, state=result.state)


def test_the_step_asks_only_for_what_is_missing_and_writes_the_sidecar(tmp_path: Path):
    """A second revision with the same content is answered from the store; a new model is the only one asked."""
    store = Store(tmp_path / "w.db")
    backend = Counting()
    try:
        for n, models in enumerate((["key", "bpm"], ["key", "bpm"], ["key", "bpm", "mood"])):
            audio = write_tone(tmp_path / f"{n}.wav", 0.2)  # the same content each time
            analyse_one(store, backend, audio, models)
            doc = json.loads((tmp_path / f"{n}.wav.analysis.json").read_text())
            assert doc["complete"] and sorted(doc["models"]) == sorted(models)
    finally:
        store.close()
    assert backend.asked == [["key", "bpm"], ["mood"]]


class Rich(Counting):
    """Answers with nested numbers and lists, as real models do."""

    def answer(self, spec: str) -> ModelResult:
        values = {"bpm": 120.0, "beats": [0.5, 1, 2.5e-07], "labels": {"é": [0.25]}, "n": None}
        return ModelResult(spec, spec, "2.1", "c-1", values)


def test_a_sidecar_from_fresh_answers_has_the_bytes_of_one_from_the_store(tmp_path: Path):
    """The results a step just received are written as the store gives them back to a later copy, byte for byte."""
    store = Store(tmp_path / "w.db")
    backend = Rich()
    texts = []
    try:
        for n in range(2):
            audio = write_tone(tmp_path / f"{n}.wav", 0.2)  # the same content: the second is answered by the store
            analyse_one(store, backend, audio, ["key", "bpm"])
            text = (tmp_path / f"{n}.wav.analysis.json").read_text()
            texts.append(text[text.index('"models": {') : text.index('"errors"')])
    finally:
        store.close()
    assert backend.asked == [["key", "bpm"]]
    assert '"beats": [' in texts[0] and texts[0] == texts[1]
