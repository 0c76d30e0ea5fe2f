"""Shared fixtures: the loopback emulator, generated audio, settings in temp folders, and waiting helpers."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sqlite3
import struct
import threading
import time
import wave
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

# Hypothesis first: imported after trio (which selenium brings), its plugin's end-of-run import warned, and the
# warning, an error here, ended a run of a few test files with an internal error after all had passed.
import hypothesis  # noqa: F401
import pytest

from tests.billcheck import discrepancies, postgres_lines, sqlite_lines, unique
from tests.pg import pg_cluster, pg_url  # noqa: F401  (fixtures: a throwaway PostgreSQL)
from watcher.audiofile import FileBody, signature
from watcher.config import AnalysisConfig, FolderConfig, RetryConfig, Settings
from watcher.emulator import App, Emulator, Ledger, Request
from watcher.emulator.neuralanalog import NeuralAnalogEmulator
from watcher.emulator.server import HTTPServerThread
from watcher.services.http import HttpPolicy
from watcher.services.neuralanalog import NeuralAnalogClient

API_KEY = "test-key-5f1c2a9e"


# -- the bill is the oracle: every test whose emulator billed anything is held against watcher's ledger ---------

_LEDGERS: weakref.WeakSet[Ledger] = weakref.WeakSet()
_ledger_init = Ledger.__init__


def _tracked_init(self: Ledger) -> None:
    _ledger_init(self)
    _LEDGERS.add(self)


Ledger.__init__ = _tracked_init  # type: ignore[method-assign]  # every emulator's bill, wherever it is made
BILL_STATS: dict[str, int] = {"checked": 0, "exempt": 0, "discrepant": 0}


@pytest.fixture(autouse=True)
def _bill_is_the_oracle(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """After a test whose emulator billed anything: the bill equals watcher's ledger (tests/billcheck.py), unless
    the test is marked ``bill_exempt`` with the reason it must differ."""
    before = [c for ledger in list(_LEDGERS) for c in ledger.charges()]  # held, so that no id() is reused
    seen = {id(c) for c in before}
    # a test's own PostgreSQL store is read after the test: made now, it is dropped after this check
    pg = request.getfixturevalue("pg_url") if "pg_url" in request.fixturenames else None
    yield
    new = [c for ledger in list(_LEDGERS) for c in ledger.charges() if id(c) not in seen]
    if not new:
        return
    exempt = request.node.get_closest_marker("bill_exempt")
    verdict = "exempt" if exempt is not None else "checked"
    found: list[str] = []
    if exempt is None:
        lines = sqlite_lines(tmp_path)
        if pg is not None:
            lines = unique(lines + postgres_lines(pg))
        found = discrepancies(new, lines)
        verdict = "discrepant" if found else "checked"
    BILL_STATS[verdict] += 1
    report = os.environ.get("BILL_REPORT")
    if report:
        with open(report, "a") as out:
            out.write(json.dumps({"test": request.node.nodeid, "outcome": verdict, "found": found}) + "\n")
    if found:
        pytest.fail("the bill differs from watcher's ledger:\n  " + "\n  ".join(found), pytrace=False)


@pytest.fixture
def gate_stand_in(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """For tests of a service client alone (no store, no gate): every paid request gets a fresh ticket, as a
    gate's take would give it; returns the requests ticketed. The wire guard itself is tested in test_wire.py."""
    import watcher.services.http as http
    from watcher.sending import WireTicket, issue, spend_ticket

    ticketed: list[str] = []

    def stand_in(what: str, covers: Any = None) -> WireTicket:
        ticketed.append(what)
        issue(WireTicket(-len(ticketed), tuple(covers or ("paid",))))
        return spend_ticket(what, covers)

    monkeypatch.setattr(http, "spend_ticket", stand_in)
    return ticketed


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line: how many tests were held against the bill, and with what result."""
    if any(BILL_STATS.values()):
        terminalreporter.write_line(
            f"bill vs ledger: {BILL_STATS['checked'] + BILL_STATS['discrepant']} tests checked, "
            f"{BILL_STATS['discrepant']} with discrepancies, {BILL_STATS['exempt']} exempt (marked bill_exempt)"
        )


def write_tone(path: Path, seconds: float = 1.0, *, freq: float = 440.0, rate: int = 22050, channels: int = 2) -> Path:
    """A small PCM WAV file whose content depends on ``freq`` and ``seconds``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = bytearray()
    for i in range(int(seconds * rate)):
        v = int(8000 * math.sin(2 * math.pi * freq * i / rate))
        frames += struct.pack("<" + "h" * channels, *([v] * channels))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(frames))
    return path


def write_silent_wav(path: Path, megabytes: float) -> Path:
    """A large WAV of digital silence, written fast (for upload and memory tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        block = bytes(1 << 20)
        for _ in range(int(megabytes)):
            w.writeframes(block)
    return path


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)  # sleep-ok: the polling step of a deadline-bounded wait


def query(tmp_path: Path, sql: str, *args: object) -> tuple | None:
    """One row from the daemon's store (``tmp_path/state``) through a fresh read-only connection."""
    db = tmp_path / "state" / "watcher.db"
    if not db.exists():
        return None
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, args).fetchone()
    except sqlite3.OperationalError:
        return None  # the schema is still being created
    finally:
        conn.close()


# -- a loopback webhook receiver, shared by the webhook and observability tests -------------------------------


class Receiver:
    """A loopback webhook receiver: answers the statuses in ``script`` first, then 200 (or waits on ``gate``)."""

    def __init__(self, script: tuple[int, ...] = (), gate: threading.Event | None = None) -> None:
        self.script = list(script)
        self.gate = gate
        self.received: list[tuple[bytes, Mapping[str, str]]] = []  # headers: case-insensitive
        self.lock = threading.Lock()
        app = App()
        app.route("POST", "/hooks/(?P<token>[a-z0-9]+)", "POST /hooks")(self.handle)
        self.server = HTTPServerThread([app]).start()
        self.url = self.server.url + "/hooks/tok3n"

    def handle(self, req: Request) -> None:
        raw = req.body()
        with self.lock:
            self.received.append((raw, req.headers))
            status = self.script.pop(0) if self.script else 200
        if self.gate is not None:
            self.gate.wait(10)
        req.send_json(status, {"ok": status < 400}, headers={"Retry-After": "0"} if status == 429 else None)

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(raw) for raw, _ in self.received]


# -- the store's adapters: every contract test runs against each one ------------------------------------------

ADAPTERS = ["sqlite", "postgres"]


@pytest.fixture(params=ADAPTERS)
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """A factory opening the same (new, empty) store again and again, for one adapter; closed afterwards."""
    from watcher.store import Store

    opened: list[Any] = []
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else ""

    def factory() -> Any:
        if url:
            from watcher.store.postgres import PostgresStore

            store: Any = PostgresStore(url)
        else:
            store = Store(tmp_path / "contract.db")
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[[], Any]) -> Any:
    """A fresh store of the adapter under test."""
    return open_store()


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """Both emulated services on 127.0.0.1, with fake (hash-derived) analysis results."""
    with Emulator(analysis_key=API_KEY, use_local=False) as emu:
        yield emu


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


def make_settings(tmp_path: Path, folder: Path, emulator_url: str, **analysis: Any) -> Settings:
    """Settings for one fast-settling folder analysed through the emulator."""
    return Settings(
        state_dir=tmp_path / "state",
        folders=(FolderConfig(path=folder, settle_seconds=0.3, rescan_interval=3600),),
        analysis=AnalysisConfig(base_url=emulator_url, api_key=API_KEY, **analysis),
        retry=RetryConfig(backoff_initial=0.2, backoff_max=1.0, max_attempts=4, needs_user_backoff=60),
    )


class DaemonThread:
    """A Daemon running on its own event loop in a thread, stoppable like SIGTERM would."""

    def __init__(self, settings: Settings, **options: Any) -> None:
        from watcher.daemon import Daemon

        self.daemon = Daemon(settings, handle_signals=False, **options)
        self.loop = asyncio.new_event_loop()
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.exit_code = self.loop.run_until_complete(self.daemon.run())
        except BaseException as exc:
            self.error = exc
        finally:
            self.loop.close()

    def start(self) -> DaemonThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0, *, force: bool = False) -> int | None:
        """Stop as SIGTERM does (``force``: as a second SIGTERM, checkpointing running jobs at once)."""
        self.loop.call_soon_threadsafe(lambda: self.daemon.request_stop("test", force=force))
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the daemon did not stop"
        if self.error:
            raise self.error
        return self.exit_code


@pytest.fixture
def run_daemon() -> Iterator[Callable[..., DaemonThread]]:
    started: list[DaemonThread] = []

    def start(settings: Settings, **options: Any) -> DaemonThread:
        d = DaemonThread(settings, **options).start()
        started.append(d)
        return d

    yield start
    for d in started:
        if d._thread.is_alive():
            d.stop()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's own config, keys or systemd environment."""
    for name in list(os.environ):
        if name.startswith("WATCHER_") or name in (
            "ESSENTIA_API_KEY",
            "NEURALANALOG_API_KEY",
            "CREDENTIALS_DIRECTORY",
            "STATE_DIRECTORY",
            "NOTIFY_SOCKET",
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WATCHER_WEB__ENABLED", "false")  # tests that want the page say so in their settings
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


# -- the processing service's emulator, shared per module by the client and emulator tests --------------

NA_KEY = "na-key-123456"
NA_POLICY = HttpPolicy(rate_per_second=1000, wait_initial=0.02, wait_max=0.1, wait_jitter=0.01, attempts=3)
T = TypeVar("T")


@dataclass
class Service:
    emu: NeuralAnalogEmulator
    api: HTTPServerThread
    storage: HTTPServerThread

    def run(self, fn: Callable[[NeuralAnalogClient], Awaitable[T]], key: str | None = NA_KEY, url: str = "") -> T:
        async def go() -> T:
            async with NeuralAnalogClient(url or self.api.url, key, NA_POLICY) as client:
                return await fn(client)

        return asyncio.run(go())


def serve() -> Iterator[Service]:
    """One emulator and its two started servers, stopped afterwards (shared per module: a stop takes ~0.5 s)."""
    emu = NeuralAnalogEmulator(api_key=NA_KEY)
    api, storage = emu.start_pair()
    try:
        yield Service(emu, api, storage)
    finally:
        api.stop()
        storage.stop()
        emu.close()


def fresh(service: Service) -> Service:
    """The shared emulator, reset: no objects, no faults, no recorded requests."""
    service.emu.reset()
    service.api.reset()
    service.storage.reset()
    return service


@pytest.fixture(scope="module")
def servers() -> Iterator[Service]:
    """The processing emulator shared by one test module."""
    yield from serve()


@pytest.fixture
def na(servers: Service) -> Service:
    """The module's processing emulator, reset for this test."""
    return fresh(servers)


def body(path: Path) -> FileBody:
    return FileBody(path, signature(path))
