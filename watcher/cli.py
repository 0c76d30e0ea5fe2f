"""The command line: parses arguments, calls the daemon or a command (watcher.commands), prints; no business logic.

`scan`, `retry`, `pause`, `resume`, `status`, `web` and `backfill` go to the running daemon through its control
socket (watcher.control) when one runs, and work on the store directly only when the state folder's lock
proves that none does.

Exit codes: 0 success; 1 some work failed (`scan`), `doctor` found a problem, or the daemon stopped on an
internal failure;
2 a usage or configuration error (the message names the key or argument); 3 start-up failed (the state
folder or store cannot be used: in use by another watcher, or not ours to open).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from watcher import __version__, clihelp
from watcher.config import Settings, find_config, load_settings, secrets_of
from watcher.errors import ConfigError, StartupError
from watcher.log import configure_logging, register_secrets
from watcher.names import display

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_STARTUP = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="watcher",
        description="Watch folders for new audio, analyse it, and archive its processed versions.",
        epilog="Exit codes: 0 ok, 1 work failed (or doctor found a problem), 2 usage or configuration error, "
        "3 start-up failed.",
    )
    parser.add_argument("--version", action="version", version=f"watcher {__version__}")
    parser.add_argument("--config", type=Path, help="config file (default: $WATCHER_CONFIG, else the platform's)")
    parser.add_argument(
        "--log-format",
        choices=["auto", "console", "json"],
        default="auto",
        help="console on a terminal, JSON lines otherwise (default: auto)",
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides log_level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _work_commands(sub)
    _control_commands(sub)
    _store_commands(sub)
    clihelp.add_completion_command(sub)
    clihelp.finish(parser, sub)  # examples in each --help; global options also after the command
    return parser


def _work_commands(sub: Any) -> None:
    """`run` and `scan`: the commands that process files."""

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("folders", nargs="*", type=Path, metavar="FOLDER", help="folders to watch (replace [[folders]])")

    scan = sub.add_parser("scan", help="process what is in PATH now, then exit (1 if anything failed)")
    scan.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    scan.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    scan.add_argument(
        "--dry-run",
        action="store_true",
        help="send nothing and write nothing: print what each file would cost (models, versions, audio minutes)",
    )


def _control_commands(sub: Any) -> None:
    """`status`, `retry`, `doctor`, `pause`, `resume` and `emulate`: the commands around the work."""
    status = sub.add_parser("status", help="counts per stage and every file that failed, with its reason")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--all", action="store_true", help="list every file, not only those in progress")

    retry = sub.add_parser("retry", help="make failed or held files (or the given paths) due again")
    retry.add_argument("paths", nargs="*", type=Path, metavar="PATH")
    retry.add_argument("--failed", action="store_true", help="every failed file")
    retry.add_argument(
        "--in-doubt",
        action="store_true",
        help="send again every paid request held in doubt (its answer was lost: the service may count it twice)",
    )

    spend = sub.add_parser("spend", help="the spend ledger of a billing period, to hold against the invoice")
    spend.add_argument("--from", dest="first", required=True, metavar="DATE", help="first UTC day (YYYY-MM-DD)")
    spend.add_argument("--to", dest="last", required=True, metavar="DATE", help="last UTC day, included")
    spend.add_argument("--csv", action="store_true", help="one CSV row per paid request (default: a summary)")

    doctor = sub.add_parser("doctor", help="check the config, folders, limits, disk space and the services")
    doctor.add_argument("folders", nargs="*", type=Path, metavar="FOLDER", help="check these folders instead")

    pause = sub.add_parser("pause", help="stop processing a folder's files (they are still recorded)")
    pause.add_argument("folder", type=Path, metavar="FOLDER")
    resume = sub.add_parser("resume", help="process a paused folder's files again")
    resume.add_argument("folder", type=Path, metavar="FOLDER")

    sub.add_parser("web", help="print the running daemon's page address and a new one-time login link to it")

    backfill = sub.add_parser(
        "backfill", help="show (or with --yes queue) the work a config change added for files already processed"
    )
    backfill.add_argument("--yes", action="store_true", help="queue it now, whatever its price")

    adopt = sub.add_parser("adopt", help="take over a folder another store owns (rewrites its .watcher-folder)")
    adopt.add_argument("folder", type=Path, metavar="FOLDER")

    emulate = sub.add_parser("emulate", help="serve both services' emulators on loopback (tests, demos)")
    emulate.add_argument("--host", default="127.0.0.1")
    emulate.add_argument("--port", type=int, default=8765)
    emulate.add_argument("--analysis-key", help="require this Bearer key on the analysis endpoint")
    emulate.add_argument("--processing-key", help="require this X-API-Key on the processing endpoints")
    emulate.add_argument(
        "--fake-analysis",
        action="store_true",
        help="answer every model with hash-derived values, even when local analysis is installed",
    )


def _store_commands(sub: Any) -> None:
    """`store backup` and `store restore`: copies of the store (SQLite), or the lines to run (PostgreSQL)."""
    store = sub.add_parser("store", help="back up or restore the store (the record of every file and paid call)")
    actions = store.add_subparsers(dest="action", required=True, metavar="ACTION")
    backup = actions.add_parser("backup", help="copy the store to PATH (a new file, or a folder); safe while running")
    backup.add_argument("path", type=Path, metavar="PATH")
    restore = actions.add_parser("restore", help="replace the store by the copy in PATH (stop the daemon first)")
    restore.add_argument("path", type=Path, metavar="PATH")
    move = actions.add_parser("migrate", help="copy the store into an empty PostgreSQL database (daemons stopped)")
    move.add_argument("--to", required=True, metavar="URL", help="postgresql://USER@HOST:PORT/DB (no password)")
    move.add_argument("--dry-run", action="store_true", help="print the rows per table; change nothing")


def _settings(args: argparse.Namespace, folders: list[Path] | None = None) -> Settings:
    path = find_config(args.config, os.environ)
    overrides: dict[str, Any] = {}
    if args.log_level:
        overrides["log_level"] = args.log_level
    settings = load_settings(path, os.environ, folders=folders, **overrides)
    register_secrets(secrets_of(settings))
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    clihelp.complete(parser)  # a shell asking for completions is answered here, and nothing runs
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level or "info")
    log = structlog.get_logger("watcher.cli")
    try:
        return _dispatch(args)
    except _Exit as exc:
        print(f"watcher: {exc}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        print(f"watcher: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StartupError as exc:
        print(f"watcher: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except (OSError, sqlite3.Error) as exc:
        log.error("startup.failed", error=f"{type(exc).__name__}: {exc}", next="exiting with code 3")
        print(f"watcher: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "emulate":
        return _emulate(args)
    if args.command == "completion":
        print(clihelp.completion_script(args.shell), end="")
        return EXIT_OK
    if args.command == "run":
        settings = _settings(args, args.folders or None)
        configure_logging(args.log_format, settings.log_level)
        from watcher.daemon import Daemon
        from watcher.sdnotify import notifier_from_environ

        def reload() -> Settings:
            fresh = _settings(args, args.folders or None)
            configure_logging(args.log_format, fresh.log_level)
            return fresh

        daemon = Daemon(settings, reload=reload, notifier=notifier_from_environ(os.environ))
        return asyncio.run(daemon.run())
    if args.command == "scan":
        return _scan(args)
    if args.command == "status":
        return _status(_settings(args), as_json=args.json, all_files=args.all)
    if args.command == "web":
        return _web(_settings(args))
    if args.command == "backfill":
        return _backfill(_settings(args), yes=args.yes)
    if args.command == "doctor":
        from watcher.doctor import run_doctor

        folders = args.folders or None
        if folders is None:  # what the running daemon watches (it may have been given folders on its command line)
            ran, answer = _run_or_fail(_settings(args), {"command": "folders"})
            if ran:
                folders = [Path(p) for p in answer["folders"]]
                print(f"checking the folders the running daemon (pid {answer['pid']}) watches\n")
        findings = run_doctor(_settings(args, folders), find_config(args.config, os.environ))
        for finding in findings:
            print(finding.line())
        bad = sum(not f.ok for f in findings)
        print(f"\n{bad} problem(s) found" if bad else "\nno problems found")
        return EXIT_FAILED if bad else EXIT_OK
    if args.command in ("pause", "resume"):
        return _pause(_settings(args), args.folder, paused=args.command == "pause")
    if args.command == "adopt":
        return _adopt(_settings(args), args.folder)
    if args.command == "store":
        return _store(_settings(args), args)
    if args.command == "retry":
        return _retry(_settings(args), args.paths, failed=args.failed, in_doubt=args.in_doubt)
    if args.command == "spend":
        return _spend(_settings(args), args.first, args.last, as_csv=args.csv)
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces the choices


def _spend(settings: Settings, first: str, last: str, *, as_csv: bool) -> int:
    """`watcher spend`: the ledger lines of a period as CSV, or per service and day: requests paid, audio
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
        total = totals.setdefault((line["day"], line["service"]), counts)
        total[line["paid"]] += 1
        if line["paid"] == "yes":
            total["s"] += line["seconds"]
            total["e"] += line["seconds"] if line["estimated"] else 0.0
        elif line["paid"] == "maybe":
            total["m"] += line["seconds"]
    print(f"spend from {first} to {last} (UTC days)")
    for (day, service), t in sorted(totals.items()):
        note = f" ({t['e'] / 60:.2f} of them estimated)" if t["e"] else ""
        doubt = f"{int(t['maybe'])} in doubt (may be billed: {t['m'] / 60:.2f} audio minutes); " if t["maybe"] else ""
        print(
            f"  {day} {service}: {int(t['yes'])} paid request(s), {t['s'] / 60:.2f} audio minutes{note}; "
            f"{doubt}{int(t['no'])} not paid (not sent or refused)"
        )
    if not totals:
        print("  nothing recorded")
    return EXIT_OK


def _daemon(settings: Settings, request: dict[str, Any], on_progress: Any = None) -> tuple[bool, Any]:
    """(True, its answer) when a daemon runs on the state folder and took ``request``; (False, None) when none
    runs (then the caller works on the store directly). A refusal by the daemon is raised as CommandFailed."""
    from watcher.control import NoDaemon, ask

    try:  # no look at the folder first: one we may not enter must be a permission error, not "no daemon"
        return True, ask(settings.state_dir, request, on_progress=on_progress)
    except NoDaemon:
        return False, None


@contextlib.contextmanager
def _no_daemon(settings: Settings, *, hold: bool = True) -> Any:
    """Work on the store directly: only while the state folder's lock proves that no daemon runs (``hold``: keep
    the lock for the whole command; else it is taken for an instant, as a proof)."""
    from watcher.statelock import StateLock

    if not settings.state_dir.is_dir():
        yield
        return
    lock = StateLock(settings.state_dir)
    try:
        lock.acquire()
    except StartupError:
        holder = StateLock.holder(settings.state_dir) or "another process"
        raise StartupError(
            f"{holder} holds the state folder {settings.state_dir}, but its control socket does not answer (is it "
            "still starting? try again; an older watcher has no socket: restart it)"
        ) from None
    if not hold:
        lock.release()
    try:
        yield
    finally:
        lock.release()


def _run_or_fail(settings: Settings, request: dict[str, Any], on_progress: Any = None) -> tuple[bool, Any]:
    """:func:`_daemon`, with the daemon's refusal turned into the CLI's message and exit code."""
    from watcher.control import CommandFailed

    try:
        return _daemon(settings, request, on_progress)
    except CommandFailed as exc:
        raise _Exit(str(exc), exc.exit_code) from None


class _Exit(Exception):
    """A message for stderr and the exit code that goes with it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _scan(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(args.log_format, settings.log_level)
    from watcher import commands

    paths = commands.absolute(args.paths)  # the daemon runs elsewhere: `scan .` means here
    if args.dry_run:
        print(commands.dry_run(settings, paths).render(), end="")
        return EXIT_OK
    progress = sys.stderr.isatty() and not args.no_progress
    if progress and args.log_level is None and settings.log_level == "info":
        configure_logging(args.log_format, "warning")  # on a terminal the bar tells the progress, not a line per file
    bar = _Bar() if progress else None
    try:
        ran, answer = _run_or_fail(
            settings, {"command": "scan", "paths": [str(p) for p in paths]}, bar.update if bar else None
        )
    finally:
        if bar is not None:
            bar.close()
    if ran:
        code, problems = int(answer["exit"]), answer["problems"]
    else:
        with _no_daemon(settings, hold=False):
            pass  # the direct scan takes the lock itself, for as long as it runs
        code, problems = asyncio.run(commands.scan(settings, paths, progress=progress))
    for p in problems:
        word = "FAILED" if p["state"] == "failed" else p["state"].upper()
        print(f"{word} {display(p['path'])} ({p['pipeline']}, {p['step']}): {p['error']}", file=sys.stderr)
    return code


class _Bar:
    """The progress bar of a scan that the daemon runs (tqdm, on stderr), fed by its progress messages."""

    def __init__(self) -> None:
        self._bar: Any = None

    def update(self, progress: dict[str, Any]) -> None:
        total, done = int(progress.get("total", 0)), int(progress.get("done", 0))
        if total == 0:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, unit="file", desc="watcher scan")
        self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _status(settings: Settings, *, as_json: bool, all_files: bool) -> int:
    from watcher.commands import status
    from watcher.status import render

    brief = not (as_json or all_files)  # the text's first files and problems, read through indexes
    ran, report = _run_or_fail(settings, {"command": "status", "brief": brief})
    if not ran:
        with _no_daemon(settings, hold=False):
            report = status(settings, brief=brief)
    print(json.dumps(report, indent=2, default=str) if as_json else render(report, all_files=all_files))
    return EXIT_OK


def _web(settings: Settings) -> int:
    ran, answer = _run_or_fail(settings, {"command": "web"})
    if not ran:
        print(f"watcher: no daemon runs on {settings.state_dir}: start one (`watcher run`)", file=sys.stderr)
        return EXIT_FAILED
    if not answer["running"]:
        print(f"the page is not running: {answer['problem']}", file=sys.stderr)
        return EXIT_FAILED
    print(f"page: {answer['url']}")
    print(f"log in: {answer['login']}")
    return EXIT_OK


def _backfill(settings: Settings, *, yes: bool) -> int:
    from watcher.commands import backfill

    ran, found = _run_or_fail(settings, {"command": "backfill", "yes": yes})
    if not ran:
        with _no_daemon(settings):
            found = backfill(settings, confirm=yes)
    if not found["jobs"]:
        print("nothing to back-fill: every file has what the config asks for")
        return EXIT_OK
    price = ", ".join(f"{service} {m:g}" for service, m in found["minutes"].items()) or "none"
    unknown = f" (+{found['unknown_duration']} file(s) of unknown length)" if found["unknown_duration"] else ""
    print(f"back-fill: {found['jobs']} job(s): {found['what']}")
    print(f"price: {found['total_minutes']:g} audio minutes ({price}){unknown}; daily caps apply")
    if found["queued"]:
        print(f"queued {found['queued']} job(s)")
    elif not yes:
        print("nothing queued: `watcher backfill --yes` queues it")
    return EXIT_OK


def _pause(settings: Settings, folder: Path, *, paused: bool) -> int:
    from watcher.commands import absolute, pause

    where = absolute([folder])[0]
    ran, answer = _run_or_fail(settings, {"command": "pause" if paused else "resume", "folder": str(where)})
    if ran:
        path = answer["folder"]
    else:
        with _no_daemon(settings):
            path = pause(settings, where, paused=paused)
    print(f"{display(path)}: {'paused' if paused else 'resumed'}")
    if paused:
        print("new files are still recorded; nothing is processed until `watcher resume`")
    return EXIT_OK


def _adopt(settings: Settings, folder: Path) -> int:
    from watcher.commands import adopt

    path, before, mine = adopt(settings, folder)
    if before == mine:
        print(f"{display(path)}: already owned by this store ({mine})")
    else:
        print(f"{display(path)}: now owned by this store ({mine}); it was owned by {before or 'no store'}")
        print("a daemon of the other store that is still running works on it until it stops: stop or reload it")
        print("restart (or reload) this store's daemons to start processing it")
    return EXIT_OK


def _store(settings: Settings, args: argparse.Namespace) -> int:
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


def _retry(settings: Settings, paths: list[Path], *, failed: bool, in_doubt: bool) -> int:
    from watcher.commands import absolute, retry

    targets = absolute(paths)
    if not targets and not failed and not in_doubt:
        raise ConfigError("say what to retry: PATH..., --failed or --in-doubt")
    request = {"command": "retry", "paths": [str(p) for p in targets], "failed": failed, "in_doubt": in_doubt}
    ran, answer = _run_or_fail(settings, request)
    if ran:
        n = int(answer["retried"])
    else:
        with _no_daemon(settings):
            n = retry(settings, targets, failed=failed, in_doubt=in_doubt)
    print(f"{n} job(s) will be retried" + ("" if n else " (nothing matched)"))
    return EXIT_OK


def _emulator_config(url: str, analysis_key: str | None, processing_key: str | None) -> str:
    """The config to paste to point watcher at this emulator (keys only as placeholders: they are the user's)."""
    a_key = "the --analysis-key value" if analysis_key else "any value (no key required)"
    p_key = "the --processing-key value" if processing_key else "any value (no key required)"
    return (
        "\n# to use it, paste into your config (then set ESSENTIA_API_KEY and NEURALANALOG_API_KEY):\n"
        f'[analysis]\nbase_url = "{url}"   # ESSENTIA_API_KEY: {a_key}\n'
        f'[archive]\nbase_url = "{url}"   # NEURALANALOG_API_KEY: {p_key}\n'
        "\n# requests as they arrive:"
    )


def _emulate(args: argparse.Namespace) -> int:
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
    print(_emulator_config(emulator.url, args.analysis_key, args.processing_key), flush=True)

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
