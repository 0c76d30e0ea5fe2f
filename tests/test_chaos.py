"""Chaos: real daemon processes SIGKILLed at random while a hostile emulator injects faults.

The promises checked: paid work is requested at most once per (content, operation) unless the product
showed it in doubt and the user re-sent it; files are never lost; every file gets a complete sidecar and is
delivered or shown in doubt; no temp file is left. ``CHAOS_SEED=<n>`` replays a run's randomness.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest

from watcher.emulator.chaos import (
    ChaosPlan,
    overpaid,
    paid_operations,
    plan_drops,
    reported_resends,
    retried_pairs,
    run_chaos,
)


@pytest.mark.serial  # eight daemon processes in turn, killed at random instants: it runs alone
@pytest.mark.timeout(120)
def test_kills_copies_and_faults_never_pay_twice(tmp_path: Path) -> None:
    """100 files (20 identical copies), 8 SIGKILLs and 10 % faults: every promise holds."""
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 2**31))
    print(f"\nchaos seed {seed} (replay: CHAOS_SEED={seed})", flush=True)
    result = run_chaos(ChaosPlan(root=tmp_path, seed=seed, files=100, copies=20, kills=8, rate=0.1))
    print(result.table(), flush=True)
    assert (result.files, result.copies) == (100, 20) and result.kills >= 8
    assert sum(result.injected.values()) > 0, "chaos injected no fault: the run proves nothing"
    where = f"seed {seed}, daemon log {tmp_path / 'daemon.log'}"
    assert not result.problems, f"{where}:\n" + "\n".join(result.problems)


def test_the_plan_is_seeded_and_copies_are_identical(tmp_path: Path) -> None:
    """The same seed plans the same files in the same bursts; copies carry their original's bytes."""
    plan = ChaosPlan(root=tmp_path, seed=11, files=30, copies=6, kills=3)
    first, again = plan_drops(plan, random.Random(11)), plan_drops(plan, random.Random(11))
    assert [[d.name for d in b] for b in first] == [[d.name for d in b] for b in again] and len(first) == 4
    drops = [d for burst in first for d in burst]
    assert len(drops) == 30 and len({d.name for d in drops}) == 30
    originals = {d.name: d for d in drops if d.copy_of is None}
    assert len(originals) == 24 and len({d.sha256 for d in originals.values()}) == 24
    copies = [d for d in drops if d.copy_of is not None]
    assert len(copies) == 6 and all(c.data == originals[c.copy_of].data for c in copies if c.copy_of)


def test_the_judge_allows_a_second_payment_only_after_an_in_doubt_retry() -> None:
    """A pair paid twice is a problem unless the status showed it in doubt (then up to two are allowed)."""
    paid: Counter[tuple[str, str]] = Counter(
        {("a", "upload"): 2, ("a", "master"): 2, ("b", "analyze:key"): 2, ("b", "analyze:bpm_degara"): 3}
    )
    entries = [
        {"path": "/in/a.wav", "pipeline": "archive", "operation": "upload", "since": "t"},
        {"path": "/in/b copy.wav", "pipeline": "analyze", "operation": "analyze", "since": "t"},
        {"path": "/in/never.wav", "pipeline": "archive", "operation": "master", "since": "t"},
    ]
    retried, strays = retried_pairs(entries, {"/in/a.wav": "a", "/in/b copy.wav": "b"}, paid)
    assert retried == {("a", "upload"), ("b", "analyze:key"), ("b", "analyze:bpm_degara")}
    assert strays == [entries[2]]
    assert overpaid(paid, retried, Counter()) == {("a", "master"): 2, ("b", "analyze:bpm_degara"): 3}
    assert overpaid(paid, retried, Counter({("a", "master"): 1, ("b", "analyze:bpm_degara"): 1})) == {
        ("b", "analyze:bpm_degara"): 3
    }
    assert paid_operations("archive", "POST /master-audio")("master")
    assert paid_operations("analyze", "analyze:key")("analyze:key")
    assert not paid_operations("analyze", "analyze:key")("analyze:bpm_degara")
    assert paid_operations("archive", "process")("stems") and not paid_operations("archive", "process")("analyze:key")


def test_the_judge_reads_the_resends_watcher_reported(tmp_path: Path) -> None:
    """Re-asks and re-sends the daemon logged (with their content) are what the judge allows, per operation."""
    log = tmp_path / "daemon.log"
    log.write_text(
        '{"event": "paid.resend", "sha256": "b", "operations": ["analyze:key:1", "analyze:bpm_degara"]}\n'
        '{"event": "paid.resend", "sha256": "a", "operations": ["upload"]}\n'
        '{"event": "paid.resend", "sha256": "a", "operations": ["stems:mastered"]}\n'
        "not json at all\n"
        '{"event": "archive.uploaded", "sha256": "a"}\n'
    )
    assert reported_resends(log) == Counter(
        {("b", "analyze:key"): 1, ("b", "analyze:bpm_degara"): 1, ("a", "upload"): 1, ("a", "stems"): 1}
    )
