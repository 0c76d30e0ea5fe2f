"""The chaos scenario: real daemon processes killed at random, copies of files, and a hostile emulator.

It checks what watcher promises: paid work is requested at most once per (content, operation), files are
never lost, and every in-doubt case is shown to the user. The emulator runs in this process and counts
what it could bill (:meth:`Emulator.paid`); the daemon runs as ``python -m watcher ... run`` subprocesses,
SIGKILLed at instants drawn from a seeded RNG and restarted. Used by ``tests/test_chaos.py`` (small) and
``bench/chaos.py`` (at scale). Everything random comes from ``ChaosPlan.seed``, so a run can be replayed
(thread timing aside).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import sys
import time
import wave
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watcher.emulator import Emulator
from watcher.emulator.chaos_daemon import ANALYSIS_KEY, PROCESSING_KEY, DaemonProcess, until, write_config
from watcher.emulator.chaos_judge import (
    ChaosResult,
    job_state,
    overpaid,
    paid_operations,
    reported_resends,
    retried_pairs,
)
from watcher.fsutil import TEMP_PREFIX

__all__ = [
    "ChaosPlan",
    "ChaosResult",
    "overpaid",
    "paid_operations",
    "plan_drops",
    "reported_resends",
    "retried_pairs",
    "run_chaos",
]

SIDECAR_SUFFIX = ".analysis.json"
READY_WAIT = 5.0  # seconds to wait for a start's `daemon.ready` before going on regardless
@dataclass
class ChaosPlan:
    """What to run: ``files`` in all, ``copies`` of them byte-identical to others, ``kills`` SIGKILLs."""

    root: Path  # an empty folder: inbox, output, state, config and the daemon's log go here
    seed: int
    files: int = 100
    copies: int = 20
    kills: int = 8
    rate: float = 0.1  # chaos fault probability per request while the kills go on
    kill_delay: tuple[float, float] = (0.05, 1.2)  # seconds after a burst before the next SIGKILL
    settle_timeout: float = 40.0  # seconds to wait, after the last restart, for every file to settle
    retry_timeout: float = 20.0  # seconds to wait after `watcher retry --in-doubt`
    python: str = sys.executable
    say: Callable[[str], None] = print  # progress lines


def wav_bytes(rng: random.Random) -> bytes:
    """A short mono 16-bit WAV of seeded noise: distinct content per draw, a few kilobytes."""
    frames = rng.randrange(400, 2400)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(rng.randbytes(frames * 2))
    return buf.getvalue()


@dataclass
class Drop:
    """One file to drop: its name in the inbox, its bytes, their sha256, and whether it copies another."""

    name: str
    data: bytes
    sha256: str
    copy_of: str | None = None


def plan_drops(plan: ChaosPlan, rng: random.Random) -> list[list[Drop]]:
    """The files in ``kills + 1`` bursts; half the copies land in the same burst as their original."""
    if not 0 <= plan.copies < plan.files:
        raise ValueError(f"copies must be fewer than files ({plan.copies} of {plan.files})")
    bursts: list[list[Drop]] = [[] for _ in range(plan.kills + 1)]
    originals: list[tuple[Drop, int]] = []
    for i in range(plan.files - plan.copies):
        data = wav_bytes(rng)
        drop = Drop(f"take-{i:04d}.wav", data, hashlib.sha256(data).hexdigest())
        where = rng.randrange(len(bursts))
        bursts[where].append(drop)
        originals.append((drop, where))
    for j in range(plan.copies):
        source, where = rng.choice(originals)
        copy = Drop(f"copy-{j:04d}-of-{source.name}", source.data, source.sha256, source.name)
        bursts[where if rng.random() < 0.5 else rng.randrange(len(bursts))].append(copy)
    for burst in bursts:
        rng.shuffle(burst)
    return bursts


def _json_file(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


class Scenario:
    """One chaos run; :meth:`run` returns its :class:`ChaosResult`."""

    def __init__(self, plan: ChaosPlan) -> None:
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self.inbox = plan.root.resolve() / "inbox"  # as the daemon names paths
        self.out = plan.root.resolve() / "out"
        self.dropped: list[Drop] = []
        self.shown_in_doubt: dict[str, set[str]] = {}  # path -> pipelines the status showed in doubt
        self.in_doubt_entries: list[dict[str, Any]] = []
        self.last_status: dict[str, Any] | None = None
        self._status_at = 0.0

    # -- the disk ----------------------------------------------------------------------------------------

    def drop(self, burst: list[Drop]) -> None:
        for d in burst:
            (self.inbox / d.name).write_bytes(d.data)
            self.dropped.append(d)

    def sidecar_ok(self, d: Drop) -> bool:
        doc = _json_file(self.inbox / (d.name + SIDECAR_SUFFIX))
        return bool(doc and doc.get("complete") is True and (doc.get("source") or {}).get("sha256") == d.sha256)

    def delivered(self, d: Drop) -> bool:
        doc = _json_file(self.out / Path(d.name).stem / "manifest.json")
        return bool(doc and (doc.get("source") or {}).get("sha256") == d.sha256)

    # -- the product's own report ------------------------------------------------------------------------

    def status(self, daemon: DaemonProcess) -> dict[str, Any] | None:
        """``watcher status --json``; remembers every in-doubt case it shows."""
        done = daemon.watcher("status", "--json")
        try:
            report = json.loads(done.stdout)
        except ValueError:
            return None
        if not isinstance(report, dict):
            return None
        self.last_status = report
        for entry in report.get("in_doubt") or []:
            self.shown_in_doubt.setdefault(str(entry.get("path")), set()).add(str(entry.get("pipeline")))
        for f in report.get("files") or []:
            for kind, job in (f.get("jobs") or {}).items():
                if job_state(job) == "in_doubt":
                    self.shown_in_doubt.setdefault(str(f.get("path")), set()).add(kind)
        return report

    def _in_doubt(self, d: Drop, pipeline: str) -> bool:
        """Whether the status showed this pipeline in doubt for this file or a copy of its content
        (work is per content, so a copy may wait on its original's in-doubt operation)."""
        return any(
            pipeline in self.shown_in_doubt.get(str(self.inbox / other.name), set())
            for other in self.dropped
            if other.sha256 == d.sha256
        )

    def _failed(self, report: dict[str, Any] | None) -> set[str]:
        """Paths with a job the product gave up on (so waiting longer will not help)."""
        out: set[str] = set()
        for f in (report or {}).get("files") or []:
            if any(job_state(j) == "failed" for j in (f.get("jobs") or {}).values()):
                out.add(str(f.get("path")))
        return out

    def settled(self, daemon: DaemonProcess, *, need_delivery: bool) -> bool:
        """Every file analysed and delivered, or (unless ``need_delivery``) shown in doubt, or failed for good.

        The disk answers first; the product's status (at most once a second) for in-doubt and failed files.
        """

        def done(d: Drop) -> bool:
            analysed = self.sidecar_ok(d) or (not need_delivery and self._in_doubt(d, "analyze"))
            return analysed and (self.delivered(d) or (not need_delivery and self._in_doubt(d, "archive")))

        waiting = [d for d in self.dropped if not done(d)]
        if not waiting:
            return True
        if time.monotonic() - self._status_at < 1.0:
            return False
        self._status_at = time.monotonic()
        failed = self._failed(self.status(daemon))
        return all(str(self.inbox / d.name) in failed or done(d) for d in waiting)

    # -- the run -----------------------------------------------------------------------------------------

    def run(self) -> ChaosResult:
        plan = self.plan
        started = time.monotonic()
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(exist_ok=True)
        bursts = plan_drops(plan, self.rng)
        copied = {d.sha256 for burst in bursts for d in burst if d.copy_of}
        with Emulator(analysis_key=ANALYSIS_KEY, processing_key=PROCESSING_KEY, use_local=False) as emu:
            daemon = DaemonProcess(plan, write_config(plan, emu.url))
            # A job the product lost track of (a killed request, a lost answer) must still finish, as it
            # would at the real service: the archive of an audio ID takes the newest version of each kind.
            emu.processing.faults.complete_after = 1.0
            emu.chaos(plan.seed, plan.rate)
            try:
                daemon.start()
                last = len(bursts) - 1
                for k, burst in enumerate(bursts):
                    until(daemon.ready, READY_WAIT)  # one that never logs ready is still killed and checked
                    self.drop(burst)
                    plan.say(f"burst {k + 1}/{len(bursts)}: {len(burst)} files (start {daemon.starts})")
                    if k == last:
                        if k == 0:  # no kills: faults meet the work for a random while all the same
                            time.sleep(self.rng.uniform(*plan.kill_delay))  # sleep-ok: a random instant
                        break
                    time.sleep(self.rng.uniform(*plan.kill_delay))  # sleep-ok: a random instant to kill at
                    daemon.kill()
                    daemon.start()
                    if k + 1 == last:
                        emu.chaos(plan.seed, 0.0)  # faults off after the last restart
                emu.chaos(plan.seed, 0.0)
                return self._finish(emu, daemon, copied, started)
            finally:
                daemon.stop()

    def _finish(self, emu: Emulator, daemon: DaemonProcess, copied: set[str], started: float) -> ChaosResult:
        plan = self.plan
        problems: list[str] = []
        if not until(lambda: self.settled(daemon, need_delivery=False), plan.settle_timeout, 0.2):
            problems.append(f"not settled {plan.settle_timeout:g} s after the last restart")
        if not daemon.alive():
            problems.append(f"the daemon exited on its own (code {daemon.proc.returncode if daemon.proc else None})")
        before = self.status(daemon) or self.last_status or {}
        entries = [e for e in before.get("in_doubt") or [] if isinstance(e, dict)]
        self.in_doubt_entries = entries
        sha_of = {str(self.inbox / d.name): d.sha256 for d in self.dropped}
        retried, strays = retried_pairs(entries, sha_of, emu.paid())
        problems += [f"in doubt for a file never dropped: {entry}" for entry in strays]
        retry = daemon.watcher("retry", "--in-doubt")
        if entries:
            until(lambda: self.settled(daemon, need_delivery=True), plan.retry_timeout, 0.2)
        paid = emu.paid()
        resent = reported_resends(daemon.log_path)
        double = overpaid(paid, retried, resent)
        problems += self.check_files()
        problems += [
            f"paid {n} times for {op} of content {sha[:12]} ({self._names(sha)})" for (sha, op), n in double.items()
        ]
        unknown = {sha for sha, _ in paid} - {d.sha256 for d in self.dropped}
        if unknown:
            problems.append(f"paid for {len(unknown)} content(s) never dropped")
        if retry.returncode != 0:
            problems.append(f"`watcher retry --in-doubt` exited {retry.returncode}: {retry.stderr.strip()[-300:]}")
        leftovers = sorted(str(p.relative_to(plan.root)) for p in plan.root.rglob(f"{TEMP_PREFIX}*"))
        if leftovers:
            problems.append(f"{len(leftovers)} temp file(s) or folder(s) left: {', '.join(leftovers[:5])}")
        return ChaosResult(
            seed=plan.seed,
            files=len(self.dropped),
            copies=sum(1 for d in self.dropped if d.copy_of),
            kills=daemon.starts - 1,
            injected=Counter(f"{route} {fault}" if fault == "lose_answer" else fault for route, fault in emu.injected),
            paid=paid,
            in_doubt=entries,
            retried=retried,
            resent=resent,
            retry_exit=retry.returncode,
            double_paid=double,
            copied_contents=copied,
            problems=sorted(problems, key=lambda p: p.startswith("paid ")),  # the rarer kinds first
            seconds=time.monotonic() - started,
        )

    def _names(self, sha: str) -> str:
        return ", ".join(d.name for d in self.dropped if d.sha256 == sha)

    def check_files(self) -> list[str]:
        """Every file still there with its bytes, a complete sidecar of it, and delivered or shown in doubt."""
        problems: list[str] = []
        for d in self.dropped:
            path = self.inbox / d.name
            with contextlib.suppress(OSError):
                if path.read_bytes() != d.data:
                    problems.append(f"{d.name}: its bytes changed")
                    continue
            if not path.exists():
                problems.append(f"{d.name}: the file is gone")
                continue
            if not self.sidecar_ok(d):
                problems.append(f"{d.name}: no complete sidecar with its sha256")
            if not self.delivered(d) and not self._in_doubt(d, "archive"):
                state = self._states(path)
                problems.append(f"{d.name}: neither delivered nor shown in doubt (jobs: {state})")
        return problems

    def _states(self, path: Path) -> str:
        for f in (self.last_status or {}).get("files") or []:
            if f.get("path") == str(path):
                jobs = f.get("jobs") or {}
                return ", ".join(f"{k} {job_state(j)} {j.get('error', '')}".strip() for k, j in jobs.items())
        return "not in the status"


def run_chaos(plan: ChaosPlan) -> ChaosResult:
    """Run the scenario in ``plan.root`` (an empty folder) and return what happened."""
    return Scenario(plan).run()
