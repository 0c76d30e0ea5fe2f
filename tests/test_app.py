"""The composition root: what App.build makes of settings, and that everything it wires is told what happens."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import SecretStr

from tests.conftest import API_KEY, make_settings, wait_for, write_tone
from watcher.app import App
from watcher.config import AnalysisConfig, ArchiveConfig, FolderConfig, Settings, SidecarConfig
from watcher.errors import ConfigError
from watcher.events import Subscriber
from watcher.runner import Outcome


class Recorder(Subscriber):
    """A subscriber that keeps every event it is told."""

    def __init__(self) -> None:
        self.settled: list[str] = []
        self.outcomes: list[Outcome] = []
        self.paid_calls: list[tuple[str, str, str, float]] = []
        self.done: asyncio.Event | None = None

    def file_settled(self, folder: str, path: str) -> None:
        self.settled.append(path)

    def outcome(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if outcome.state == "done" and self.done is not None:
            self.done.set()

    def paid(self, budget: str, operation: str, ending: str, seconds: float) -> None:
        self.paid_calls.append((budget, operation, ending, seconds))


def build(settings: Settings, **kw: object) -> App:
    return App.build(settings, **kw)  # type: ignore[arg-type]


def close(app: App) -> None:
    asyncio.run(app.aclose())


def test_pipelines_follow_the_settings(tmp_path):
    """Analysis only, archive only, both, or neither (a configuration error naming both switches)."""
    remote = AnalysisConfig(api_key=SecretStr("k-123456"))
    archive = ArchiveConfig(enabled=True, output_dir=tmp_path / "out")
    cases = [
        (Settings(state_dir=tmp_path / "a", analysis=remote), ["analyze"]),
        (Settings(state_dir=tmp_path / "b", analysis=remote, archive=archive), ["analyze", "archive"]),
        (Settings(state_dir=tmp_path / "c", analysis=AnalysisConfig(enabled=False), archive=archive), ["archive"]),
    ]
    for settings, names in cases:
        app = build(settings)
        try:
            assert list(app.pipelines) == names
            assert [name for name, _ in app.sink.jobs] == names
            assert app.runner.pipelines == app.pipelines
        finally:
            close(app)
    with pytest.raises(ConfigError, match=r"analysis\.enabled and archive\.enabled are false"):
        build(Settings(state_dir=tmp_path / "d", analysis=AnalysisConfig(enabled=False)))


def test_our_own_folders_inside_a_watched_folder_are_never_work(tmp_path):
    """Output, done, failed and sidecar folders below a watched folder are excluded from detection."""
    inbox = tmp_path / "inbox"
    folder = FolderConfig(path=inbox, done_dir=inbox / "done", failed_dir=tmp_path / "elsewhere")
    settings = Settings(
        state_dir=tmp_path / "s",
        folders=(folder,),
        analysis=AnalysisConfig(api_key=SecretStr("k-123456")),
        archive=ArchiveConfig(enabled=True, output_dir=inbox / "out"),
        sidecar=SidecarConfig(directory=inbox / "sidecars"),
    )
    app = build(settings)
    try:
        assert sorted(settings.own_dirs(folder)) == ["done", "out", "sidecars"]
        detector = app.make_detector(settings.folders)
        wanted = detector.folders[str(inbox)].filter.wants_dir
        assert [wanted(d) for d in ("done", "out", "sidecars/x", "album")] == [False, False, False, True]
    finally:
        close(app)


def test_subscribers_and_the_request_observer_hear_everything(tmp_path, inbox, emulator):
    """A settled file, its job's outcome, the paid call and the HTTP request reach what the root attached."""
    recorder = Recorder()
    requests: list[tuple[str, str, str]] = []
    settings = make_settings(tmp_path, inbox, emulator.url)
    app = build(
        settings,
        subscribers=[recorder],
        observer=lambda svc, method, secs, code, sent: requests.append((svc, method, code)),
    )

    async def main() -> None:
        try:
            stop = asyncio.Event()
            recorder.done = asyncio.Event()
            detector = app.make_detector(settings.folders)
            tasks = [asyncio.create_task(app.runner.run(stop)), asyncio.create_task(detector.run(stop))]
            write_tone(inbox / "a.wav", 0.3)
            await recorder.done.wait()
            stop.set()
            await asyncio.gather(*tasks)
        finally:  # on the loop that made the client's connection (kept alive): another loop cannot close it
            await app.aclose()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert recorder.settled == [str(inbox / "a.wav")]
    assert [(o.job.pipeline, o.state) for o in recorder.outcomes] == [("analyze", "done")]
    assert recorder.paid_calls == [("analysis", "analyze", "answered", pytest.approx(0.3))]
    assert requests == [("analysis service", "POST", "ok")]
    assert wait_for(lambda: (inbox / "a.wav.analysis.json").exists())


def test_a_build_that_fails_closes_the_store(tmp_path):
    """A configuration error while building leaves no store open behind (the state folder stays usable)."""
    settings = Settings(state_dir=tmp_path / "s", analysis=AnalysisConfig(backend="remote", enabled=False))
    with pytest.raises(ConfigError):
        build(settings)
    again = build(Settings(state_dir=tmp_path / "s", analysis=AnalysisConfig(api_key=SecretStr(API_KEY))))
    close(again)
    assert Path(tmp_path / "s" / "watcher.db").exists()


def test_files_settled_together_are_recorded_at_once_and_told_once(tmp_path):
    """The sink's batch: every new revision registered with its jobs, an already known one left alone, each new
    file told to subscribers once and the workers woken once."""
    from watcher.audiofile import Signature
    from watcher.detect.detector import Settled

    folder = FolderConfig(path=tmp_path / "in")
    recorder = Recorder()
    app = build(Settings(state_dir=tmp_path / "s", analysis=AnalysisConfig(api_key=SecretStr("k-123456"))),
                subscribers=[recorder])  # fmt: skip
    woken: list[None] = []
    app.sink.wake = lambda: woken.append(None)
    try:
        known = Settled(folder, str(tmp_path / "in" / "c.wav"), "c.wav", Signature(3, 3, 3))
        asyncio.run(app.sink.ready(known.folder, known.path, known.rel_path, known.signature))
        files = [Settled(folder, str(tmp_path / "in" / f"{n}.wav"), f"{n}.wav", Signature(1, 1, i)) for i, n in
                 enumerate("ab")] + [known]  # fmt: skip
        asyncio.run(app.sink.ready_many(files))
        assert recorder.settled == [known.path, files[0].path, files[1].path]
        assert len(woken) == 2  # once for the single file, once for the batch
        assert app.store.counts() == {"analyze": {"pending": 3}}
        asyncio.run(app.sink.ready_many(files))  # all known now: nothing told, nobody woken
        assert len(recorder.settled) == 3 and len(woken) == 2
    finally:
        close(app)


def test_one_bandwidth_limit_is_shared_by_every_service_session(tmp_path):
    """`bwlimit` gives the analysis, processing and storage sessions the same limit; "off" gives none."""
    from watcher.services.http import ServiceHTTP

    def sessions(app: App) -> list[ServiceHTTP]:
        found = []
        for closer in app.closers:
            for holder in (closer, getattr(closer, "client", None), getattr(closer, "storage", None)):
                http = getattr(holder, "http", None)
                if isinstance(http, ServiceHTTP):
                    found.append(http)
        return found

    remote = AnalysisConfig(api_key=SecretStr("k-123456"))
    archive = ArchiveConfig(enabled=True, output_dir=tmp_path / "out")
    for name, limit in (("on", "08:00,512k 19:00,off"), ("off", "off")):
        app = build(Settings(state_dir=tmp_path / name, analysis=remote, archive=archive, bwlimit=limit))
        try:
            limits = [http.policy.bandwidth for http in sessions(app)]
            assert {http.service for http in sessions(app)} >= {"analysis service", "processing service"}
            if limit == "off":
                assert limits == [None] * len(limits)
            else:
                assert len(limits) == 3 and limits[0] is not None and all(b is limits[0] for b in limits)
                assert str(limits[0].table) == limit
        finally:
            close(app)
