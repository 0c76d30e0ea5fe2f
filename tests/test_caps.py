"""A daily cap changed while jobs wait for it: real `watcher run` processes, reloaded by SIGHUP or restarted.

Before: a job the cap deferred waited for the next UTC day whatever the new cap said, and status kept saying
the cap was reached. Now every start and reload makes those jobs due; the gate decides again under the cap in force.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for, write_tone
from tests.test_control import (
    STREAM,
    DaemonProcess,
    base_config,
    cli,
    emu,  # noqa: F401  (a fixture)
    env_for,
    sidecar,
    write_config,
)
from watcher.emulator import Emulator
from watcher.store import Operation, utc_day

pytestmark = pytest.mark.timeout(120)


def with_cap(body: str, minutes: float) -> str:
    """``body`` with ``[analysis] daily_audio_minutes`` set (its section is the second of base_config)."""
    return body.replace("[retry]\n", f"daily_audio_minutes = {minutes!r}\n[retry]\n", 1)


def status(env: dict[str, str], cfg: Path) -> dict[str, Any]:
    done = cli("status", "--json", env=env, cfg=cfg)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def cap_problems(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in report["problems"] if p["error_code"] == "capped"]


def capped_third(inbox: Path, env: dict[str, str], cfg: Path, emulator: Emulator) -> dict[str, Any]:
    """Three 1-s files under a 2.5-s cap: two analysed, the third deferred by the cap; the report then."""
    for n in range(3):
        write_tone(inbox / f"t{n}.wav", 1.0, freq=300 + 100 * n)
    report = wait_for(
        lambda: (s := status(env, cfg)) and cap_problems(s) and s, timeout=40, what="the third file capped"
    )
    assert emulator.api.counts()[STREAM] == 2
    assert report["spend"]["analysis"]["capped_at"]
    return report


@pytest.mark.parametrize("how", ["reload", "restart"])
def test_a_raised_cap_lets_the_capped_jobs_go_on_today(tmp_path, inbox, emu, how):  # noqa: F811
    """1. a 2.5-s cap stops the third of three 1-s files; 2. the cap raised to 2.8 s (still reached) and
    reloaded: the job is due again, the gate defers it again at no cost, status names the new cap; 3. the cap
    raised to 100 min and reloaded (or the daemon restarted): the third file is analysed today, each file paid
    once, and status no longer says capped."""
    env = env_for(tmp_path)
    body = base_config(tmp_path, inbox, emu)
    cfg = write_config(tmp_path, with_cap(body, 2.5 / 60))
    d = DaemonProcess(tmp_path, cfg, env)
    try:
        capped_third(inbox, env, cfg, emu)

        cfg.write_text(with_cap(body, 2.8 / 60))
        d.reload()
        again = wait_for(
            lambda: (s := status(env, cfg)) and [p for p in cap_problems(s) if "0.0466667" in p["error"]] and s,
            timeout=30,
            what="the job deferred again under the new cap",
        )
        assert again["spend"]["analysis"]["capped_at"] and emu.api.counts()[STREAM] == 2
        assert [e["jobs"] for e in d.events("cap.jobs_due")] == [1]

        cfg.write_text(with_cap(body, 100.0))
        if how == "reload":
            d.reload()
        else:
            assert d.stop() == 0
            d = DaemonProcess(tmp_path, cfg, env)
        wait_for(
            lambda: all(sidecar(inbox / f"t{n}.wav").exists() for n in range(3)), timeout=30, what="the third sidecar"
        )
        (due,) = d.events("cap.jobs_due")[-1:]
        assert due["jobs"] == 1 and due["daily_audio_minutes"]["analysis"] == 100.0
        report = status(env, cfg)
        assert cap_problems(report) == [] and report["spend"]["analysis"]["capped_at"] is None
        assert not report["backlog"]["analyze"]["capped"]
        human = cli("status", env=env, cfg=cfg).stdout
        assert "is reached" not in human and "held back" not in human, human
        assert emu.api.counts()[STREAM] == 3  # each file paid once
    finally:
        d.stop()


def test_waking_capped_jobs_clears_the_days_mark_and_keeps_the_rest(store):
    """Both adapters: a job the cap deferred is due now, its reason gone, its attempts kept; a job waiting for
    another reason stays as it was; today's ``capped_at`` is cleared, so the next refusal marks the day anew."""
    for name in ("a", "b"):
        args = {"folder": "/in", "path": f"/in/{name}.wav", "rel_path": f"{name}.wav", "jobs": [("analyze", "analyze")]}
        store.register_revision(size=1, mtime_ns=1, inode=ord(name), **args)
    tomorrow = time.time() + 86400
    capped, other = store.claim("analyze", "a"), store.claim("analyze", "a")
    cause = {"error": "the daily cap ... is reached", "error_code": "capped", "count_attempt": True}
    store.release(capped, next_attempt_at=tomorrow, **cause)
    store.release(other, next_attempt_at=tomorrow, error="waiting for its answer", error_code="waiting")
    ops = [Operation(f"{n:064x}", "analysis http://y account:2", "analyze:key", "", "reask") for n in range(2)]
    assert [store.gate_take([op], "a", budget="analysis", seconds=10.0, cap_seconds=15.0)[0].verdict for op in ops] == [
        "send",
        "capped",
    ]
    assert store.spend_on(utc_day(time.time()))["analysis"]["capped_at"] is not None
    assert store.next_due("analyze") == pytest.approx(tomorrow)

    assert store.wake_capped() == 1
    woken, waiting = store.get_job(capped.id), store.get_job(other.id)
    assert woken.last_error is None and woken.error_code is None and woken.attempts == 1
    assert waiting.error_code == "waiting" and waiting.last_error == "waiting for its answer"
    assert store.next_due("analyze") <= time.time() + 1  # due now, not tomorrow
    assert store.spend_on(utc_day(time.time()))["analysis"]["capped_at"] is None
    again = store.gate_take([ops[1]], "a", budget="analysis", seconds=10.0, cap_seconds=15.0)[0]
    assert again.verdict == "capped" and again.first_cap  # still reached: refused again, the day marked anew
    assert store.wake_capped() == 0  # nothing deferred by a cap any more
