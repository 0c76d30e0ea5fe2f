"""The commands about what work costs: `watcher backfill`, `watcher scan --dry-run` and `watcher spend`."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from watcher.app import store_path
from watcher.commands.common import absolute, open_store
from watcher.config import Settings, service_identity
from watcher.errors import ConfigError
from watcher.store import Store


def _analysis_backend(settings: Settings) -> tuple[str, str]:
    """(which backend analyses: ``remote`` or ``local``, the key its results are stored under)."""
    from watcher.backends import choose_backend

    if not settings.analysis.enabled:
        return "remote", ""
    which, _ = choose_backend(settings.analysis)
    cfg = settings.analysis
    return which, "local" if which == "local" else service_identity("analysis", cfg.base_url, cfg.api_key)


def _pipelines(settings: Settings) -> tuple[list[str], list[str]]:
    """(the enabled pipelines, those of them that pay a service)."""
    enabled = (["analyze"] if settings.analysis.enabled else []) + (["archive"] if settings.archive.enabled else [])
    paid = [p for p in enabled if p != "analyze" or _analysis_backend(settings)[0] == "remote"]
    return enabled, paid


def backfill(settings: Settings, *, confirm: bool, limit: float | None = None) -> dict[str, Any]:
    """`watcher backfill`: the work the config added for files already there (watcher.backfill), with its price in
    audio minutes; ``confirm`` queues it, unless ``limit`` is given and the price is above it (then it waits).
    Only what was added since the store last caught up (state_dir/backfill.json) is owed."""
    from watcher import backfill as fill

    store = open_store(settings)
    try:
        enabled, paid = _pipelines(settings)
        key = _analysis_backend(settings)[1]
        plan = fill.find(settings, store, pipelines=enabled, analysis_key=key, since=fill.recorded(settings))
        cost = fill.price(plan, paid=paid)
        waits = limit is not None and cost["total_minutes"] > limit
        queued = fill.apply(store, plan) if confirm and plan.jobs and not waits else 0
        return {
            "jobs": plan.jobs,
            "what": plan.describe(),
            **cost,
            "queued": queued,
            "waiting": plan.jobs if plan.jobs and not queued else 0,
        }
    finally:
        store.close()


def dry_run(settings: Settings, paths: Sequence[Path]) -> Any:
    """`watcher scan --dry-run`: what would be asked and paid for, from the store opened read-only; first the
    back-fill (work the config added for files already there, queued at the next start or reload)."""
    from watcher import backfill as fill
    from watcher.dryrun import dry_run as plan

    which, analysis_key = _analysis_backend(settings)
    archive = settings.archive
    processing_key = service_identity("processing", archive.base_url, archive.api_key)
    store = None
    if store_path(settings).exists():
        try:
            store = Store(store_path(settings), readonly=True)
        except sqlite3.Error:
            store = None
    try:

        def priced(chosen: Sequence[Path]) -> Any:
            return plan(
                settings,
                chosen,
                cached_models=lambda sha: set(store.results_for(sha, analysis_key)) if store else set(),
                answered_operations=lambda sha: store.answered_operations(sha, processing_key) if store else set(),
                remote=which == "remote",
            )

        report = priced(absolute(paths))
        if store is not None:
            since = fill.recorded(settings)
            owed = fill.find(settings, store, pipelines=_pipelines(settings)[0], analysis_key=analysis_key, since=since)
            if owed.jobs:
                return _Reports(
                    [
                        (
                            f"back-fill ({owed.describe()}; queued at the next start or reload):",
                            priced([Path(p) for p in owed.all_paths()]),
                        ),
                        ("scan:", report),
                    ]
                )
        return report
    finally:
        if store is not None:
            store.close()


SPEND_FIELDS = (
    "day", "at", "service", "endpoint", "account", "operation", "sha256", "models", "seconds", "estimated", "kind",
    "outcome", "paid", "budget", "ending",
)  # fmt: skip
# budget and ending are appended (the columns before keep their places); service and outcome, the same values
# under their earlier names, are deprecated and go in 0.4.0.


def _paid(ending: str) -> str:
    """Whether the service bills a ledger line: ``yes`` (answered, partly or late), ``no`` (not sent, refused) or
    ``maybe`` (in doubt or still sending: the whole request may have reached it; the invoice tells)."""
    if ending in ("not_sent", "refused"):
        return "no"
    return "maybe" if ending in ("in_doubt", "sending") else "yes"


def spend(settings: Settings, first_day: str, last_day: str) -> list[dict[str, Any]]:
    """`watcher spend`: every ledger line of the UTC days ``first_day`` to ``last_day`` (ISO dates, inclusive),
    to hold against a service's invoice; ``paid`` says yes, no (not sent, refused) or maybe (in doubt)."""

    for value in (first_day, last_day):
        try:
            dt.date.fromisoformat(value)
        except ValueError:
            raise ConfigError(f"{value!r} is not a date: give --from and --to as YYYY-MM-DD (UTC days)") from None
    if last_day < first_day:
        raise ConfigError(f"--to {last_day} is before --from {first_day}")
    store = open_store(settings)
    try:
        lines = store.ledger_lines(first_day, last_day)
    finally:
        store.close()
    return [
        {
            "day": line["day"],
            "at": dt.datetime.fromtimestamp(line["at"], dt.UTC).isoformat(timespec="seconds"),
            "service": line["service"],
            "endpoint": " ".join(str(line.get("endpoint") or "").split()[:2]),  # the service and its URL
            # the key's fingerprint (never the key): one invoice per account, also after a key changed
            "account": " ".join(str(line.get("endpoint") or "").split()[2:]).removeprefix("account:"),
            "operation": line["operation"],
            "sha256": line["sha256"],
            "models": line["models"],
            "seconds": round(float(line["seconds"]), 3),
            "estimated": bool(line["estimated"]),
            "kind": line["kind"],
            "outcome": line["outcome"],
            "paid": _paid(line["outcome"]),
            "budget": line["service"],  # the ledger's columns keep their names: service, outcome
            "ending": line["outcome"],
        }
        for line in lines
    ]


class _Reports:
    """Several dry-run reports, each under its heading, rendered one after the other."""

    def __init__(self, parts: list[tuple[str, Any]]) -> None:
        self.parts = parts

    def render(self) -> str:
        return "\n".join(f"{heading}\n{report.render()}" for heading, report in self.parts)
