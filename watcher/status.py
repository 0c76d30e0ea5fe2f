"""`watcher status`: what the store knows, gathered into one report and rendered for people or scripts."""

from __future__ import annotations

import datetime as dt
from typing import Any, Protocol

from watcher import __version__
from watcher.store import TERMINAL, Job, Problem

SHOWN_FILES = 40


class StatusSource(Protocol):
    def counts(self) -> dict[str, dict[str, int]]: ...

    def problems(self) -> list[Problem]: ...

    def jobs_of_current(self) -> list[Job]: ...

    def folder_states(self) -> list[dict[str, Any]]: ...


def collect(store: StatusSource, *, state_dir: str, configured: list[str] | None = None) -> dict[str, Any]:
    """The whole report as plain data (the JSON output); ``configured`` folders are listed even if never seen."""
    folders = {f["folder"]: f for f in store.folder_states()}
    for path in configured or []:
        folders.setdefault(path, {"folder": path, "paused": False, "mode": None, "reason": None, "available": None})
    files: dict[str, dict[str, Any]] = {}
    for job in store.jobs_of_current():
        entry = files.setdefault(job.file.path, {"path": job.file.path, "jobs": {}})
        info: dict[str, Any] = {"stage": job.stage}
        if job.last_error:
            info["error"] = job.last_error
        if job.kind == "archive":
            info["versions"] = job.data.get("versions", {})
            if job.data.get("delivery"):
                info["delivery"] = job.data["delivery"]
        if job.kind == "analyze" and job.data.get("sidecar"):
            info["sidecar"] = job.data["sidecar"]
        entry["jobs"][job.kind] = info
    return {
        "version": __version__,
        "state_dir": state_dir,
        "counts": store.counts(),
        "folders": list(folders.values()),
        "problems": [p.__dict__ for p in store.problems()],
        "files": list(files.values()),
    }


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return ""
    return "; next attempt " + dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def render(report: dict[str, Any], *, all_files: bool = False) -> str:
    """The report for a terminal: counts, folders, problems with reasons, and files still in progress."""
    lines = [f"watcher {report['version']}, state in {report['state_dir']}"]
    if not report["counts"]:
        lines.append("no files recorded yet")
    for kind, stages in report["counts"].items():
        lines.append(f"{kind}: " + ", ".join(f"{stage} {n}" for stage, n in stages.items()))
    if report["folders"]:
        lines.append("\nfolders:")
        for f in report["folders"]:
            state = "paused" if f.get("paused") else ("unavailable" if f.get("available") is False else "active")
            mode = f" ({f['mode']}: {f['reason']})" if f.get("mode") else ""
            lines.append(f"  {f['folder']}: {state}{mode}")
    if report["problems"]:
        lines.append("\nneeds attention:")
        for p in report["problems"]:
            lines.append(f"  {p['path']}")
            lines.append(
                f"    {p['kind']} {p['stage']} ({p['error_kind']}, {p['attempts']} attempts"
                f"{_when(p['next_attempt_at'])}): {p['error']}"
            )
    busy = [
        f
        for f in report["files"]
        if all_files or any(j["stage"] not in TERMINAL or j.get("versions") for j in f["jobs"].values())
    ]
    if busy:
        lines.append("\nfiles:" if all_files else "\nfiles in progress or archived:")
        for f in busy[: None if all_files else SHOWN_FILES]:
            lines.append(f"  {f['path']}")
            for kind, j in f["jobs"].items():
                extra = ""
                if j.get("versions"):
                    extra = " [" + ", ".join(f"{v}: {s}" for v, s in j["versions"].items()) + "]"
                if j.get("delivery"):
                    extra += f" -> {j['delivery']}"
                lines.append(f"    {kind}: {j['stage']}{extra}")
        if not all_files and len(busy) > SHOWN_FILES:
            lines.append(f"  ... and {len(busy) - SHOWN_FILES} more (`watcher status --all` or `--json`)")
    return "\n".join(lines)
