"""Nothing paid is ever lost: a new store adopts the sidecars and deliveries on disk instead of paying again.

Real daemons against the emulator: a library analysed (and archived), its state folder deleted as on a new
machine, `watcher adopt`, a restart; the emulator's bill says what was asked again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import API_KEY, make_settings, query, wait_for, write_tone
from tests.test_archive import PKEY, archive_settings, wait_delivery
from watcher import commands
from watcher.emulator import Emulator
from watcher.pipelines.sidecar import schema
from watcher.status import render

pytestmark = pytest.mark.timeout(120)
NAMES = ("a", "b", "c", "d")


@pytest.fixture
def emu():
    with Emulator(analysis_key=API_KEY, processing_key=PKEY, use_local=False) as e:
        e.processing.faults.polls_needed = 1
        yield e


def sidecar(audio: Path) -> Path:
    return audio.with_name(audio.name + ".analysis.json")


def jobs_done(tmp_path: Path, pipeline: str) -> int:
    row = query(tmp_path, "SELECT COUNT(*) FROM jobs WHERE pipeline=? AND state='done'", pipeline)
    return int(row[0]) if row else 0


def analyse_library(tmp_path: Path, inbox: Path, settings, run_daemon, *, archived: bool = False) -> None:
    """Four files dropped and finished by a daemon, which is then stopped."""
    d = run_daemon(settings)
    for n, name in enumerate(NAMES):
        write_tone(inbox / f"{name}.wav", 0.3, freq=220 + 110 * n)
    for name in NAMES:
        wait_for(sidecar(inbox / f"{name}.wav").exists, what=f"{name}'s sidecar")
        if archived:
            wait_delivery(tmp_path, name)
    wait_for(lambda: jobs_done(tmp_path, "analyze") == 4, what="four analyses done")
    if archived:
        wait_for(lambda: jobs_done(tmp_path, "archive") == 4, what="four archives done")
    d.stop()


def lose_the_store(tmp_path: Path, inbox: Path, settings) -> None:
    """The state folder is gone (a new machine); the user adopts the watched folder as the product says."""
    shutil.rmtree(tmp_path / "state")
    commands.adopt(settings, inbox)


def test_a_lost_store_adopts_every_sidecar_and_pays_nothing(tmp_path, inbox, emu, run_daemon):
    """Four files analysed, the store lost, `watcher adopt`, a restart: 0 new requests, sidecars untouched."""
    settings = make_settings(tmp_path, inbox, emu.url)
    analyse_library(tmp_path, inbox, settings, run_daemon)
    billed = emu.paid()
    assert sum(billed.values()) == 4 * 3  # four files, three models each
    before = {name: sidecar(inbox / f"{name}.wav").read_bytes() for name in NAMES}
    for name in NAMES:
        doc = json.loads(before[name])
        assert doc["schema_minor"] == 1 and doc["backend"]["account"] not in ("", "none", API_KEY)
        assert set(doc) <= set(schema()["properties"])
    lose_the_store(tmp_path, inbox, settings)
    d = run_daemon(settings)
    wait_for(lambda: jobs_done(tmp_path, "analyze") == 4, what="four adopted analyses")
    d.stop()
    assert emu.paid() == billed  # not one request more
    assert {name: sidecar(inbox / f"{name}.wav").read_bytes() for name in NAMES} == before
    report = commands.status(settings)
    assert report["adopted"] == {"analyze": 4, "archive": 0}
    assert "adopted from sidecars: 4 analysed" in render(report)
    # the adopted results are the store's now: a copy of one file is answered from it, with no request
    shutil.copy(inbox / "a.wav", tmp_path / "copy.wav")
    shutil.move(tmp_path / "copy.wav", inbox / "copy.wav")
    d = run_daemon(settings)
    wait_for(lambda: jobs_done(tmp_path, "analyze") == 5, what="the copy's analysis")
    d.stop()
    assert emu.paid() == billed


def test_sidecars_of_other_content_endpoint_or_account_are_not_trusted(tmp_path, inbox, emu, run_daemon):
    """A sidecar for another account, another endpoint or other content is never adopted (its file is asked
    again); one written before accounts were recorded is trusted for the same endpoint."""
    settings = make_settings(tmp_path, inbox, emu.url)
    analyse_library(tmp_path, inbox, settings, run_daemon)
    billed = sum(emu.paid().values())

    def edit(name: str, change) -> None:
        path = sidecar(inbox / f"{name}.wav")
        doc = json.loads(path.read_text())
        change(doc)
        path.write_text(json.dumps(doc))

    edit("a", lambda doc: doc["backend"].update(account="0123456789ab"))  # paid with another key
    edit("b", lambda doc: doc["backend"].update(base_url="https://elsewhere.invalid"))  # another endpoint
    edit("c", lambda doc: doc["source"].update(sha256="0" * 64))  # about other content
    edit("d", lambda doc: (doc["backend"].pop("account"), doc.pop("schema_minor")))  # written before 1.1
    lose_the_store(tmp_path, inbox, settings)
    d = run_daemon(settings)
    wait_for(lambda: jobs_done(tmp_path, "analyze") == 4, what="four analyses")
    d.stop()
    assert sum(emu.paid().values()) == billed + 3 * 3  # a, b and c asked again, d adopted
    assert commands.status(settings)["adopted"]["analyze"] == 1
    for name in ("a", "b", "c"):  # rewritten from the new answers, for this endpoint and account
        doc = json.loads(sidecar(inbox / f"{name}.wav").read_text())
        assert doc["backend"]["base_url"] == emu.url and doc["backend"]["account"] != "0123456789ab"


def test_a_lost_store_adopts_verified_deliveries(tmp_path, inbox, emu, run_daemon):
    """Archive on, deliveries in place, the store lost: no upload, no processing request, no analysis; a
    delivery whose file no longer matches its manifest is made again."""
    settings = archive_settings(tmp_path, inbox, emu, versions=("original", "mastered"))
    analyse_library(tmp_path, inbox, settings, run_daemon, archived=True)
    billed = emu.paid()
    assert billed[next(k for k in billed if k[1] == "upload")] == 1
    lose_the_store(tmp_path, inbox, settings)
    d = run_daemon(settings)
    wait_for(lambda: jobs_done(tmp_path, "archive") == 4, what="four adopted deliveries")
    wait_for(lambda: jobs_done(tmp_path, "analyze") == 4, what="four adopted analyses")
    d.stop()
    assert emu.paid() == billed
    report = commands.status(settings)
    assert report["adopted"] == {"analyze": 4, "archive": 4}
    (entry,) = [f for f in report["files"] if f["path"].endswith("a.wav")]
    assert entry["jobs"]["archive"]["versions"] == {"original": "delivered", "mastered": "delivered"}
    # a delivered file damaged since: that delivery is not trusted, the file is processed again
    manifest = json.loads((tmp_path / "out" / "b" / "manifest.json").read_text())
    damaged = tmp_path / "out" / "b" / manifest["files"][0]["path"]
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\x01")
    lose_the_store(tmp_path, inbox, settings)
    d = run_daemon(settings)
    wait_for(lambda: jobs_done(tmp_path, "archive") == 4, timeout=40, what="four archives")
    d.stop()
    assert sum(emu.paid().values()) > sum(billed.values())
    assert commands.status(settings)["adopted"]["archive"] == 3
