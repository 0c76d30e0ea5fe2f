"""Chaos: real daemon processes SIGKILLed at random while a hostile emulator injects faults.

The promises checked: paid work is requested at most once per (content, operation) unless the product
showed it in doubt and the user re-sent it; files are never lost; every file gets a complete sidecar and is
delivered or shown in doubt; no temp file is left. ``CHAOS_SEED=<n>`` replays a run's randomness.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from watcher.emulator.chaos import ChaosPlan, run_chaos


@pytest.mark.timeout(120)
def test_kills_copies_and_faults_never_pay_twice(tmp_path: Path) -> None:
    """100 files (20 identical copies), 8 SIGKILLs and 10 % faults: every promise holds."""
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 2**31))
    print(f"\nchaos seed {seed} (replay: CHAOS_SEED={seed})", flush=True)
    result = run_chaos(ChaosPlan(root=tmp_path, seed=seed, files=100, copies=20, kills=8, rate=0.1))
    print(result.table(), flush=True)
    assert (result.files, result.copies) == (100, 20) and result.kills >= 8
    assert sum(result.injected.values()) > 0, "chaos injected no fault: the run proves nothing"
    assert not result.problems, f"seed {seed}: " + "\n".join(result.problems)
