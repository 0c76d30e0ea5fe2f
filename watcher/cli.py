"""The command line: parses arguments, calls the daemon or a command (watcher.commands), prints; no business logic.

`scan`, `retry`, `pause`, `resume`, `status`, `web` and `backfill` go to the running daemon through its control
socket (watcher.control) when one runs, and work on the store directly only when the state folder's lock
proves that none does (watcher.clidaemon); `spend`, `adopt`, `store` and `emulate` are in watcher.clidirect.

Exit codes: 0 success; 1 some work failed (`scan`), `doctor` found a problem, or the daemon stopped on an
internal failure;
2 a usage or configuration error (the message names the key or argument); 3 start-up failed (the state
folder or store cannot be used: in use by another watcher, or not ours to open).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import structlog

from watcher import __version__, clihelp
from watcher.clidaemon import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PIPE,
    EXIT_STARTUP,
    Exit,
    cmd_backfill,
    cmd_pause,
    cmd_retry,
    cmd_scan,
    cmd_status,
    cmd_web,
    run_or_fail,
)
from watcher.clidirect import cmd_adopt, cmd_emulate, cmd_spend, cmd_store
from watcher.config import Settings, find_config, load_settings, secrets_of
from watcher.errors import ConfigError, StartupError
from watcher.log import configure_logging, register_secrets


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
    status = sub.add_parser("status", help="counts per state and every file that failed, with its reason")
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
    except Exit as exc:
        print(f"watcher: {exc}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        print(f"watcher: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokenPipeError:
        # the reader went away (`watcher status --json | head`): it has what it wanted; nothing more to say, and
        # the exit a shell gives a command its pipe ended (128 + SIGPIPE)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit must not fail again
        return EXIT_PIPE
    except StartupError as exc:
        print(f"watcher: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except (OSError, sqlite3.Error) as exc:
        log.error("startup.failed", error=f"{type(exc).__name__}: {exc}", next="exiting with code 3")
        print(f"watcher: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "emulate":
        return cmd_emulate(args)
    if args.command == "completion":
        print(clihelp.completion_script(args.shell), end="")
        return EXIT_OK
    if args.command == "run":
        # A SIGHUP before the daemon's own handler (its first second) would end it: the config read just below is
        # the newest anyway, so until then a reload asks for nothing more.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        settings = _settings(args, args.folders or None)
        configure_logging(args.log_format, settings.log_level)
        from watcher.daemon import Daemon
        from watcher.sdnotify import notifier_from_environ

        def reload() -> Settings:
            fresh = _settings(args, args.folders or None)
            configure_logging(args.log_format, fresh.log_level)
            return fresh

        daemon = Daemon(settings, reload=reload, notifier=notifier_from_environ(os.environ))
        return run_to_exit(daemon.run())
    if args.command == "scan":
        return cmd_scan(args, _settings(args))
    if args.command == "status":
        return cmd_status(_settings(args), as_json=args.json, all_files=args.all)
    if args.command == "web":
        return cmd_web(_settings(args))
    if args.command == "backfill":
        return cmd_backfill(_settings(args), yes=args.yes)
    if args.command == "doctor":
        from watcher.doctor import run_doctor

        folders = args.folders or None
        if folders is None:  # what the running daemon watches (it may have been given folders on its command line)
            ran, answer = run_or_fail(_settings(args), {"command": "folders"})
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
        return cmd_pause(_settings(args), args.folder, paused=args.command == "pause")
    if args.command == "adopt":
        return cmd_adopt(_settings(args), args.folder)
    if args.command == "store":
        return cmd_store(_settings(args), args)
    if args.command == "retry":
        return cmd_retry(_settings(args), args.paths, failed=args.failed, in_doubt=args.in_doubt)
    if args.command == "spend":
        return cmd_spend(_settings(args), args.first, args.last, as_csv=args.csv)
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces the choices


EXIT_PATIENCE = 1.0  # seconds a stopped daemon waits for threads still blocked (on a slow share) before it ends


def run_to_exit(main: Coroutine[Any, Any, int]) -> int:
    """`watcher run`'s event loop, and the process's end. Once the daemon has stopped (work checkpointed, the
    store closed), a thread still blocked on a slow share (a file read, a listing) must not hold the process:
    asyncio.run and the interpreter would wait for it without limit (a stop took over 15 s on a slow share). It
    gets EXIT_PATIENCE seconds; then the process ends without it (its work is taken up again from the store)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        code = loop.run_until_complete(main)
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        asyncio.set_event_loop(None)
        loop.close()  # its thread pool is told to shut down, not waited for
    deadline = time.monotonic() + EXIT_PATIENCE
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    me = threading.current_thread()
    stuck = [t.name for t in threading.enumerate() if t.is_alive() and not t.daemon and t is not me]
    if stuck:
        structlog.get_logger("watcher.cli").warning(
            "daemon.exit_without_threads", threads=stuck, next="their work is taken up again at the next start"
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
