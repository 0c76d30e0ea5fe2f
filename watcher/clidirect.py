"""The CLI's commands that never go through a daemon: spend, adopt, store (backup, restore, migrate) and
emulate."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

from watcher.clidaemon import EXIT_OK
from watcher.config import Settings
from watcher.names import display


def cmd_spend(settings: Settings, first: str, last: str, *, as_csv: bool) -> int:
    """`watcher spend`: the ledger lines of a period as CSV, or per budget and day: requests paid, audio
    minutes (how much of it estimated), requests in doubt (the service may or may not bill them), and requests
    not paid (not sent, refused)."""
    import csv

    from watcher.commands import SPEND_FIELDS, spend

    lines = spend(settings, first, last)
    if as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=SPEND_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(lines)
        return EXIT_OK
    totals: dict[tuple[str, str], dict[str, float]] = {}
    for line in lines:
        counts = dict.fromkeys(("yes", "maybe", "no", "s", "e", "m"), 0.0)  # requests by paid; seconds
        total = totals.setdefault((line["day"], line["budget"]), counts)
        total[line["paid"]] += 1
        if line["paid"] == "yes":
            total["s"] += line["seconds"]
            total["e"] += line["seconds"] if line["estimated"] else 0.0
        elif line["paid"] == "maybe":
            total["m"] += line["seconds"]
    print(f"spend from {first} to {last} (UTC days)")
    for (day, budget), t in sorted(totals.items()):
        note = f" ({t['e'] / 60:.2f} of them estimated)" if t["e"] else ""
        doubt = f"{int(t['maybe'])} in doubt (may be billed: {t['m'] / 60:.2f} audio minutes); " if t["maybe"] else ""
        print(
            f"  {day} {budget}: {int(t['yes'])} paid request(s), {t['s'] / 60:.2f} audio minutes{note}; "
            f"{doubt}{int(t['no'])} not paid (not sent or refused)"
        )
    if not totals:
        print("  nothing recorded")
    return EXIT_OK


def cmd_adopt(settings: Settings, folder: Path) -> int:
    from watcher.commands import adopt

    path, before, mine = adopt(settings, folder)
    if before == mine:
        print(f"{display(path)}: already owned by this store ({mine})")
    else:
        print(f"{display(path)}: now owned by this store ({mine}); it was owned by {before or 'no store'}")
        print("a daemon of the other store that is still running works on it until it stops: stop or reload it")
        print("restart (or reload) this store's daemons to start processing it")
    return EXIT_OK


def cmd_store(settings: Settings, args: argparse.Namespace) -> int:
    """`watcher store backup|restore PATH` (see watcher.store.backup), `watcher store migrate` (watcher.migrate)."""
    from watcher.app import store_path
    from watcher.migrate import migrate
    from watcher.statelock import StateLock
    from watcher.store import backup as copies
    from watcher.store.sqlite.schema import SCHEMA

    if args.action == "migrate":
        return migrate(settings, args.to, dry_run=args.dry_run).code

    if settings.store.url:  # PostgreSQL: its own tools, run by the user (the password never printed)
        from watcher.store.postgres.pool import redact

        env = f"PGPASSFILE='{settings.store.passfile}' " if settings.store.passfile else ""
        print("# a PostgreSQL store is copied with PostgreSQL's tools; run:")
        for line in copies.postgres_commands(redact(settings.store.url), args.path, restoring=args.action == "restore"):
            print(line if line.startswith("#") else env + line)
        return EXIT_OK
    db = store_path(settings)
    if args.action == "backup":
        dest = copies.backup(db, args.path.expanduser())
        print(f"{display(str(dest))}: a copy of the store at {display(str(db))}")
        return EXIT_OK
    with StateLock.stopped(settings.state_dir, "nothing was restored"):
        version, kept = copies.restore(args.path.expanduser(), db, len(SCHEMA))
    print(f"{display(str(db))}: restored from {display(str(args.path))} (schema version {version})")
    if kept is not None:
        print(f"the store it replaced is kept in {display(str(kept))}")
    return EXIT_OK


def emulator_config(url: str, analysis_key: str | None, processing_key: str | None) -> str:
    """The config to paste to point watcher at this emulator (keys only as placeholders: they are the user's)."""
    a_key = "the --analysis-key value" if analysis_key else "any value (no key required)"
    p_key = "the --processing-key value" if processing_key else "any value (no key required)"
    return (
        "\n# to use it, paste into your config (then set ESSENTIA_API_KEY and NEURALANALOG_API_KEY):\n"
        f'[analysis]\nbase_url = "{url}"   # ESSENTIA_API_KEY: {a_key}\n'
        f'[archive]\nbase_url = "{url}"   # NEURALANALOG_API_KEY: {p_key}\n'
        "\n# requests as they arrive:"
    )


def cmd_emulate(args: argparse.Namespace) -> int:
    from watcher.emulator import Emulator

    emulator = Emulator(
        args.host,
        args.port,
        analysis_key=args.analysis_key,
        processing_key=args.processing_key,
        use_local=not args.fake_analysis,
    )
    print(f"analysis service emulator:   {emulator.url}  (POST {emulator.url}/v1/analysis/stream)", flush=True)
    print(f"processing service emulator: {emulator.url}  (storage host: {emulator.storage.url})", flush=True)
    print(emulator_config(emulator.url, args.analysis_key, args.processing_key), flush=True)

    def logged(request: Any) -> None:
        refused = " (refused: rate limit)" if request.refused else ""
        route = "" if request.route == f"{request.method} {request.path}" else f" [{request.route}]"
        print(f"{time.strftime('%H:%M:%S')} {request.method} {request.path}{route}{refused}", flush=True)

    emulator.api.on_request = logged
    emulator.storage.on_request = logged

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(KeyboardInterrupt):
        emulator.serve_forever()
    return EXIT_OK
