"""The chaos judge: what a chaos run's figures mean. Which paid requests an in-doubt entry covers, which
re-sends watcher itself reported, which (content, operation) pairs were paid more often than allowed, and
the table a run prints. Pure functions over the emulator's counters, the status and the daemon's log.
"""

from __future__ import annotations

import contextlib
import functools
import json
import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHIVE_OPERATIONS = frozenset({"upload", "restore", "master", "stems"})
# Paid operations a product's in-doubt ``operation`` may name, by a word it contains.
OPERATION_WORDS = (
    ("upload", "upload"),
    ("from-file", "upload"),
    ("restor", "restore"),
    ("upscal", "restore"),
    ("master", "master"),
    ("stem", "stems"),
)


@dataclass
class ChaosResult:
    """What happened and what was wrong; ``problems`` is empty when every promise held."""

    seed: int
    files: int
    copies: int
    kills: int
    injected: Counter[str]
    paid: Counter[tuple[str, str]]
    in_doubt: list[dict[str, Any]]
    retried: set[tuple[str, str]]  # (sha256, operation) pairs the user re-sent after the product held them
    resent: Counter[tuple[str, str]]  # re-sends the product itself logged (a lost answer asked again, counted)
    retry_exit: int | None
    double_paid: dict[tuple[str, str], int]  # pairs paid more often than once plus the re-sends reported
    copied_contents: set[str]
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        """The run's figures as a small text table."""
        per_op: Counter[str] = Counter()
        twice: Counter[str] = Counter()
        for (sha, op), n in self.paid.items():
            per_op[op] += n
            if (sha, op) in self.double_paid:
                twice[op] += 1
        on_copies = sum(1 for sha, _ in self.double_paid if sha in self.copied_contents)
        rows = [
            ("seed", str(self.seed)),
            ("files", str(self.files)),
            ("copies (identical bytes)", str(self.copies)),
            ("daemon SIGKILLs", str(self.kills)),
            ("faults injected", f"{sum(self.injected.values())} " + _inline(self.injected)),
        ]
        rows += [(f"paid {op}", f"{n}  (pairs paid twice or more: {twice[op]})") for op, n in sorted(per_op.items())]
        rows += [
            ("re-sends reported by watcher", f"{sum(self.resent.values())} " + _inline(_by_op(self.resent))),
            ("pairs paid twice, unreported", f"{len(self.double_paid)} ({on_copies} on content that has copies)"),
            ("in doubt (shown)", str(len(self.in_doubt))),
            ("retried by the user", f"{len(self.retried)} (watcher retry --in-doubt exit {self.retry_exit})"),
            ("problems", str(len(self.problems))),
            ("seconds", f"{self.seconds:.1f}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _inline(counts: Counter[str]) -> str:
    return "(" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + ")" if counts else ""


def job_state(job: dict[str, Any]) -> str | None:
    """A status job's state (the contract's ``state``; older builds said ``stage``)."""
    value = job.get("state", job.get("stage"))
    return str(value) if value is not None else None


def paid_operations(pipeline: str, operation: str) -> Callable[[str], bool]:
    """Which paid operations (``Emulator.paid`` names) an in-doubt entry covers."""
    op = operation.lower()
    if op.startswith("analyze:"):
        return lambda paid_op: paid_op == op
    for word, name in OPERATION_WORDS:
        if word in op:
            return functools.partial(operator.eq, name)
    if pipeline == "analyze" or "analy" in op:
        return lambda paid_op: paid_op.startswith("analyze:")
    if pipeline == "archive":  # an archive operation we cannot name: any of the archive's paid requests
        return lambda paid_op: paid_op in ARCHIVE_OPERATIONS
    return lambda paid_op: False


def retried_pairs(
    entries: list[dict[str, Any]], sha_of: dict[str, str], paid_before: Counter[tuple[str, str]]
) -> tuple[set[tuple[str, str]], list[dict[str, Any]]]:
    """The (content, operation) pairs a ``watcher retry --in-doubt`` may pay once more: those the status's
    in-doubt ``entries`` cover, among the pairs paid so far; and the entries naming no dropped file."""
    retried: set[tuple[str, str]] = set()
    strays: list[dict[str, Any]] = []
    for entry in entries:
        covers = paid_operations(str(entry.get("pipeline", "")), str(entry.get("operation", "")))
        sha = sha_of.get(str(entry.get("path")))
        if sha is None:
            strays.append(entry)
            continue
        retried |= {(s, op) for (s, op) in paid_before if s == sha and covers(op)}
    return retried, strays


def overpaid(
    paid: Counter[tuple[str, str]], retried: set[tuple[str, str]], resent: Counter[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    """Pairs paid more often than once plus the re-sends the product reported (a user's retry of an in-doubt
    operation is one of them; it counts even if its log line was lost to a kill)."""
    return {pair: n for pair, n in paid.items() if n > 1 + max(resent[pair], 1 if pair in retried else 0)}


def reported_resends(log: Path) -> Counter[tuple[str, str]]:
    """(content, operation) re-sends the daemon logged (``paid.resend``: models re-asked, uploads re-sent,
    held operations the user re-sent), named as the emulator bills them."""
    found: Counter[tuple[str, str]] = Counter()
    with contextlib.suppress(FileNotFoundError), log.open("r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if '"paid.resend"' not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") != "paid.resend":
                continue
            sha = str(event.get("sha256", ""))
            for name in event.get("operations") or []:
                kind, _, rest = str(name).partition(":")
                found[(sha, f"analyze:{rest.split(':', 1)[0]}" if kind == "analyze" else kind)] += 1
    return found


def _by_op(pairs: Counter[tuple[str, str]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for (_, op), n in pairs.items():
        out[op] += n
    return out
