"""The ``bwlimit`` setting: rclone's syntax parsed and refused clearly, and one limit metering real uploads and
downloads to the processing emulator over loopback, all requests together, turning with its timetable.

Timing here is only ever a lower bound (bytes cannot pass faster than the limit allows), never a speed target.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.conftest import NA_KEY, NA_POLICY, Service, body, write_silent_wav
from watcher.config import load_settings
from watcher.config.bwlimit import OFF, Rate, parse_bwlimit, parse_rate
from watcher.errors import ConfigError
from watcher.services.bandwidth import BURST_SECONDS, Bandwidth
from watcher.services.neuralanalog import NeuralAnalogClient

KiB = 1024
MiB = 1024 * 1024

# The uploads below are the processing client's alone (no store, no gate): each gets a stand-in ticket, and the
# bill has no ledger to be held against.
pytestmark = [
    pytest.mark.usefixtures("gate_stand_in"),
    pytest.mark.bill_exempt("the processing client alone, with no store: no ledger to hold the bill against"),
]


@pytest.mark.parametrize(
    ("text", "up", "down"),
    [
        ("off", None, None),
        ("512k", 512 * KiB, 512 * KiB),
        ("512K", 512 * KiB, 512 * KiB),
        ("10", 10 * KiB, 10 * KiB),  # a bare number is KiB/s, as in rclone
        ("4M", 4 * MiB, 4 * MiB),
        ("1.5M", 1.5 * MiB, 1.5 * MiB),
        ("1G", 1024 * MiB, 1024 * MiB),
        ("4096B", 4096, 4096),
        ("4M:off", 4 * MiB, None),
        ("off:512k", None, 512 * KiB),
        ("1M:2M", MiB, 2 * MiB),
        ("0", None, None),  # rclone's default: no limit
        ("0k", None, None),  # zero in any unit is no limit too, as rclone reads it
        ("0M:512k", None, 512 * KiB),
    ],
)
def test_rates_read_as_rclone_reads_them(text: str, up: float | None, down: float | None) -> None:
    """Suffixes are powers of 1024, a bare number is KiB/s, and UP:DOWN splits the directions."""
    assert parse_rate(text) == Rate(up, down)


def test_a_timetable_holds_each_rate_until_the_next_and_wraps_over_midnight() -> None:
    """Before the day's first entry the previous evening's rate is in force."""
    table = parse_bwlimit("08:00,512k 12:00,4M:off 19:00,off")
    assert table.at(7 * 60 + 59) == OFF
    assert table.at(8 * 60) == Rate(512 * KiB, 512 * KiB)
    assert table.at(12 * 60 + 30) == Rate(4 * MiB, None)
    assert table.at(23 * 60 + 59) == OFF
    assert str(table) == "08:00,512k 12:00,4M:off 19:00,off"
    assert parse_bwlimit("19:00,off 08:00,1M") == parse_bwlimit("08:00,1M 19:00,off")  # order does not matter
    assert parse_bwlimit("19:00,off;08:00,1M") == parse_bwlimit("08:00,1M 19:00,off")  # rclone's semicolons too


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("fast", "is not a rate"),
        ("4Mbps", "is not a rate"),
        ("08:00", "HH:MM,RATE"),
        ("25:00,1M", "HH:MM,RATE"),
        ("08:00,1M 08:00,off", "'08:00,1M 08:00,off': 08:00 appears twice in the timetable"),
        ("19:00,off 08:00,1M 8:00,2M", "8:00 appears twice"),  # one minute of the day, however written
        ("", "'' is empty: write off for no limit"),  # rclone refuses an empty limit too
        ("  ", "is empty"),
        ("4M:", "'4M:': the download rate is empty"),
        (":1M", "the upload rate is empty"),
        ("08:00,", "'08:00,': the rate is empty"),
        ("Mon-08:00,1M", "weekdays, as rclone's Mon-08:00, are not supported"),
        ("100B", "under 1 KiB/s"),
        ("1M:2M:3M", "one colon at most"),
    ],
)
def test_a_bad_limit_is_refused_at_load_naming_the_key(tmp_path: Path, text: str, says: str) -> None:
    """A value that cannot be read stops the load with the key and the reason, not a failing upload later."""
    config = tmp_path / "config.toml"
    config.write_text(f'bwlimit = "{text}"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config, {})
    assert "bwlimit" in str(caught.value) and says in str(caught.value)


def test_settings_keep_the_limit_written_out(tmp_path: Path) -> None:
    """The loaded value is the normalised form the daemon logs."""
    config = tmp_path / "config.toml"
    config.write_text('bwlimit = "19:00,OFF 08:00,1024k"\n')
    assert load_settings(config, {}).bwlimit == "08:00,1M 19:00,off"


def _client(na: Service, bandwidth: Bandwidth | None) -> NeuralAnalogClient:
    from dataclasses import replace

    return NeuralAnalogClient(na.api.url, NA_KEY, replace(NA_POLICY, bandwidth=bandwidth))


def _fixed(text: str, minute: int = 0) -> Bandwidth:
    return Bandwidth(parse_bwlimit(text), minute=lambda: minute)


def test_an_upload_takes_at_least_its_size_over_the_limit(na: Service, tmp_path: Path) -> None:
    """1 MiB under "512k" needs about 2 s; the service still receives every byte."""
    audio = write_silent_wav(tmp_path / "a.wav", 1)
    size = audio.stat().st_size

    async def go() -> tuple[str, float]:
        async with _client(na, _fixed("512k")) as client:
            started = time.monotonic()
            audio_id = await client.upload(body(audio))
            return audio_id, time.monotonic() - started

    audio_id, took = asyncio.run(go())
    assert na.emu.objects[audio_id].path.read_bytes() == audio.read_bytes()
    assert took >= (size / (512 * KiB)) - BURST_SECONDS - 0.05, took


def test_concurrent_uploads_share_one_limit(na: Service, tmp_path: Path) -> None:
    """Two 1 MiB uploads at once under "1M" take about 2 s together, not 1 s each side by side."""
    files = [write_silent_wav(tmp_path / f"{i}.wav", 1) for i in range(2)]
    total = sum(f.stat().st_size for f in files)
    bandwidth = _fixed("1M")

    async def go() -> float:
        async with _client(na, bandwidth) as one, _client(na, bandwidth) as two:
            started = time.monotonic()
            await asyncio.gather(one.upload(body(files[0])), two.upload(body(files[1])))
            return time.monotonic() - started

    took = asyncio.run(go())
    assert took >= total / MiB - 2 * BURST_SECONDS - 0.05, took


def test_a_download_limit_meters_what_comes_back(na: Service, tmp_path: Path) -> None:
    """"off:512k" leaves the upload free and holds a 1 MiB download to about 2 s; the file arrives whole."""
    na.emu.faults.polls_needed = 0
    audio = write_silent_wav(tmp_path / "a.wav", 1)
    size = audio.stat().st_size
    audio_id = na.run(lambda c: c.upload(body(audio)))
    dest = tmp_path / "out" / "a.wav"
    dest.parent.mkdir()

    async def go() -> float:
        async with _client(na, _fixed("off:512k")) as client:
            started = time.monotonic()
            await client.download_object("audio", audio_id, dest)
            return time.monotonic() - started

    took = asyncio.run(go())
    assert dest.read_bytes() == audio.read_bytes()
    assert took >= size / (512 * KiB) - BURST_SECONDS - 0.05, took


def test_the_timetable_turns_during_a_transfer(na: Service, tmp_path: Path) -> None:
    """A limit that lifts at the next minute lets the rest of a slow upload go at full speed."""
    audio = write_silent_wav(tmp_path / "a.wav", 4)
    lift_at = time.monotonic() + 0.5  # the clock reaches 08:01 half a second into the upload
    bandwidth = Bandwidth(
        parse_bwlimit("08:00,64k 08:01,off"), minute=lambda: 8 * 60 + (time.monotonic() >= lift_at)
    )

    async def go() -> str:
        async with _client(na, bandwidth) as client:
            return await asyncio.wait_for(client.upload(body(audio)), timeout=20)

    # Four MiB at 64 KiB/s would take a minute: the whole file arrives well within the deadline.
    audio_id = asyncio.run(go())
    assert na.emu.objects[audio_id].path.read_bytes() == audio.read_bytes()
    assert bandwidth.now() == OFF
