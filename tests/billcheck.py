"""The bill is the oracle: what an emulated service billed, held against watcher's own ledger.

The emulator's bill has one charge per request a service accepted (its content, operations and audio seconds);
watcher's ledger has one line per take at the gate (its content, operations, seconds and ending). For every
service, every (content, operation), and the audio seconds of every content whose length both sides know:

    lines answered or partial (certainly billed)  <=  billed  <=  those + lines in doubt, late or still sending

A line not sent or refused must not be billed. A (content, operation) billed more than once needs as many lines
for it, every one after the first a reported ``reask`` or ``resend``.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from watcher.config import canonical_endpoint
from watcher.emulator import Charge

CERTAIN = ("answered", "partial")
# "late": sent, and ended after its lease ran out (the node stalled, or its stop released the lease first); what
# came back is kept, but the line does not say whether the service finished (and billed) it.
MAYBE = ("in_doubt", "sending", "late")
SECONDS_SLACK = 0.05


def billed_operation(service: str, name: str) -> str:
    """A ledger operation's name as the bill spells it: ``analyze:<model>`` without version, or the processing
    service's ``upload``, ``restore``, ``master``, ``stems``."""
    if service == "analysis":
        return name.split(":", 2)[0] + ":" + name.split(":", 2)[1] if name.startswith("analyze:") else name
    return name.split(":", 1)[0]


def where_of(line: dict[str, Any]) -> str:
    """The service, host:port and account a ledger line went to, as a charge names them (``service host account``)."""
    parts = str(line.get("endpoint") or "").split()
    if len(parts) == 3:
        return f"{line['service']} {urlsplit(canonical_endpoint(parts[1])).netloc} {parts[2]}"
    return f"{line['service']} ? ?"


def sqlite_lines(root: Path) -> list[dict[str, Any]]:
    """Every ledger line of every watcher store (SQLite) under ``root``; a line found in several files (a store
    and its backups, copies of the same ledger) counts once."""
    lines: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for db in sorted(root.rglob("*.db")):
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        except sqlite3.Error:
            continue
        try:
            conn.row_factory = sqlite3.Row
            for row in conn.execute("SELECT * FROM ledger ORDER BY id"):
                line = dict(row)
                same = (line["id"], line["at"], line["service"], line["operation"], line["sha256"])
                if same not in seen:
                    seen.add(same)
                    lines.append(line)
        except sqlite3.Error:
            pass  # not a watcher store, or one made before the ledger existed
        finally:
            conn.close()
    return lines


def unique(lines: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ledger lines read from several stores, each counted once: a store migrated to PostgreSQL holds a copy of the
    SQLite ledger it came from (the same ids, times, services, operations and contents)."""
    seen: set[tuple[Any, ...]] = set()
    out: list[dict[str, Any]] = []
    for line in lines:
        same = (line["id"], line["at"], line["service"], line["operation"], line["sha256"])
        if same not in seen:
            seen.add(same)
            out.append(line)
    return out


def postgres_lines(url: str) -> list[dict[str, Any]]:
    """The ledger lines of a watcher store in PostgreSQL (none when it has no ledger yet)."""
    import psycopg
    from psycopg.rows import dict_row

    try:
        with psycopg.connect(url, row_factory=dict_row, connect_timeout=5) as conn:
            return list(conn.execute("SELECT * FROM ledger ORDER BY id").fetchall())
    except psycopg.Error:
        return []


def discrepancies(charges: Sequence[Charge], lines: Iterable[dict[str, Any]]) -> list[str]:
    """Where the bill and the ledger disagree (empty when they agree), one sentence each."""
    billed: Counter[tuple[str, str, str]] = Counter()
    billed_seconds: Counter[tuple[str, str]] = Counter()
    unknown_length: set[tuple[str, str]] = set()
    requests: Counter[str] = Counter()
    for c in charges:
        where = f"{c.service} {urlsplit(canonical_endpoint('http://' + c.host)).netloc} {c.account}"
        requests[where] += 1
        for op in c.operations:
            billed[(where, c.sha256, op)] += 1
        if c.seconds is None:
            unknown_length.add((where, c.sha256))
        else:
            billed_seconds[(where, c.sha256)] += c.seconds
    certain: Counter[tuple[str, str, str]] = Counter()
    maybe: Counter[tuple[str, str, str]] = Counter()
    again: Counter[tuple[str, str, str]] = Counter()
    sure_seconds: Counter[tuple[str, str]] = Counter()
    maybe_seconds: Counter[tuple[str, str]] = Counter()
    estimated: set[tuple[str, str]] = set()
    lines_by: dict[str, Counter[str]] = {}
    for line in lines:
        service, sha, ending = where_of(line), line["sha256"], line["outcome"]
        lines_by.setdefault(service, Counter())[ending] += 1
        if line.get("estimated"):
            estimated.add((service, sha))
        for name in str(line["operation"]).split(","):
            key = (service, sha, billed_operation(line["service"], name))
            if ending in CERTAIN:
                certain[key] += 1
            elif ending in MAYBE:
                maybe[key] += 1
            if line.get("kind", "first") != "first" and ending not in ("not_sent", "refused"):
                again[key] += 1
        if ending in CERTAIN:
            sure_seconds[(service, sha)] += float(line["seconds"])
        elif ending in MAYBE:
            maybe_seconds[(service, sha)] += float(line["seconds"])
    found: list[str] = []
    for key in sorted(set(billed) | set(certain)):
        service, sha, op = key
        low, high = certain[key], certain[key] + maybe[key]
        if not low <= billed[key] <= high:
            found.append(
                f"{service} {op} of {sha[:12]}: billed {billed[key]}, the ledger says {low} answered"
                + (f" and {maybe[key]} in doubt" if maybe[key] else "")
            )
        elif billed[key] > 1 and again[key] < billed[key] - 1:
            found.append(f"{service} {op} of {sha[:12]}: billed {billed[key]} times, {again[key]} reported re-sends")
    for key in sorted(set(billed_seconds) | set(sure_seconds)):
        if key in unknown_length or key in estimated:
            continue  # one side cannot tell the length: the operations above are compared, not the seconds
        low, high = sure_seconds[key], sure_seconds[key] + maybe_seconds[key]
        if not low - SECONDS_SLACK <= billed_seconds[key] <= high + SECONDS_SLACK:
            found.append(
                f"{key[0]} audio of {key[1][:12]}: billed {billed_seconds[key]:.2f} s, the ledger says {low:.2f} s"
                + (f" (+{maybe_seconds[key]:.2f} s in doubt)" if maybe_seconds[key] else "")
            )
    for service, count in sorted(requests.items()):
        endings = lines_by.get(service, Counter())
        low = sum(endings[o] for o in CERTAIN)
        high = low + sum(endings[o] for o in MAYBE)
        if not low <= count <= high:
            found.append(f"{service}: billed {count} request(s); the ledger: {low} answered, {high - low} in doubt")
    return found
