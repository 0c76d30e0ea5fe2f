"""The short commands, as functions over the same object graph as the daemon: scan, dry run, status, retry,
pause and resume. The CLI parses arguments and prints; the web page will call these too.
One module per theme (common, scanning, reports, manage, costs); every command is re-exported here."""

from watcher.commands.common import absolute, open_store, under
from watcher.commands.costs import SPEND_FIELDS, backfill, dry_run, spend
from watcher.commands.manage import adopt, pause, resume_service, retry
from watcher.commands.reports import current_path, status, unreachable_report, web_state
from watcher.commands.scanning import SCAN_POLL, SCAN_SETTLE, scan, scan_running, scan_targets

__all__ = [
    "SCAN_POLL",
    "SCAN_SETTLE",
    "SPEND_FIELDS",
    "absolute",
    "adopt",
    "backfill",
    "current_path",
    "dry_run",
    "open_store",
    "pause",
    "resume_service",
    "retry",
    "scan",
    "scan_running",
    "scan_targets",
    "spend",
    "status",
    "under",
    "unreachable_report",
    "web_state",
]
