"""What the store and the daemon say: `watcher status` (also while the store is unreachable), the page's
state, a file's current path and its jobs."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from watcher.commands.common import open_store
from watcher.config import Settings
from watcher.fsutil import read_json_object


def status(settings: Settings, *, daemon: dict[str, Any] | None = None, brief: bool = False) -> dict[str, Any]:
    """`watcher status`: the report as plain data (what `--json` prints). ``daemon``: the running daemon's own
    account (pid, since when, services paused, back-fill), None when none runs; ``brief``: see status.collect.
    While the store cannot be reached, the report says so (and since when) instead of waiting on it."""
    from watcher.status import collect_for
    from watcher.store.away import read_outage, unavailable

    outage = read_outage(settings.state_dir)
    if outage is not None:  # the running daemon cannot reach its store: say so rather than wait on it here
        return unreachable_report(settings, outage, daemon)
    try:
        store = open_store(settings)
        try:
            return collect_for(store, settings, daemon=daemon, web=web_state(settings), brief=brief)
        finally:
            store.close()
    except Exception as exc:
        if not unavailable(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        outage = {"unreachable_since": since, "error": first, "next": "the store did not answer this command"}
        return unreachable_report(settings, outage, daemon)


def unreachable_report(settings: Settings, outage: dict[str, Any], daemon: dict[str, Any] | None) -> dict[str, Any]:
    """The status document while the daemon's store is unreachable: the outage, and nothing the store would say."""
    from watcher import __version__
    from watcher.status import SCHEMA_VERSION

    return {
        "schema_version": SCHEMA_VERSION,
        "version": __version__,
        "state_dir": str(settings.state_dir),
        "daemon": daemon,
        "store_unreachable": outage,
        "nodes": [],
        "counts": {},
        "folders": [],
        "in_doubt": [],
        "adopted": {},
        "spend": {},
        "problems": [],
        "files": [],
        "web": web_state(settings),
    }


def web_state(settings: Settings) -> dict[str, Any] | None:
    """What the daemon last said about its page (state_dir/web.json): None when no daemon with the page runs."""
    doc = read_json_object(settings.state_dir / "web.json")
    if doc is None:
        return None
    try:
        os.kill(int(doc["pid"]), 0)  # a daemon that died without stopping leaves the file behind
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return doc


def current_path(settings: Settings, shown: str) -> str | None:
    """The path of the current file that :func:`watcher.names.display` shows as ``shown`` (the page and its API
    name files that way), or None. A name that is valid text is itself; any other is found among the files."""
    from watcher.names import find_shown

    store = open_store(settings)
    try:
        if store.current_revision(os.path.abspath(shown)) is not None:
            return os.path.abspath(shown)
        real = find_shown(os.path.abspath(shown))  # a name with undecodable bytes: found in its folder on disk
        return real if real is not None and store.current_revision(real) is not None else None
    finally:
        store.close()
