"""`watcher status`: what the store knows, gathered into one report and rendered for people or scripts."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any, Protocol

from watcher import __version__
from watcher.names import display
from watcher.store import TERMINAL, Job, Problem, utc_day

SHOWN_FILES = 40


class StatusSource(Protocol):
    def counts(self) -> dict[str, dict[str, int]]: ...

    def problems(self) -> list[Problem]: ...

    def jobs_of_current(self) -> list[Job]: ...

    def folder_states(self) -> list[dict[str, Any]]: ...

    def spend_on(self, day: str) -> dict[str, dict[str, Any]]: ...


def _iso(timestamp: float | None) -> str | None:
    if not timestamp:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def collect(
    store: StatusSource,
    *,
    state_dir: str,
    configured: list[str] | None = None,
    caps: dict[str, float] | None = None,
    now: float | None = None,
    web: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole report as plain data (the JSON output); ``configured`` folders are listed even if never seen.

    ``caps`` gives each service's daily cap in audio minutes (0: none), for the ``spend`` section;
    ``web`` says whether the daemon's page runs (``running``, ``url``, ``problem``), when known.
    """
    now = time.time() if now is None else now
    folders = {f["folder"]: f for f in store.folder_states()}
    for path in configured or []:
        folders.setdefault(path, {"folder": path, "paused": False, "mode": None, "reason": None, "available": None})
    for f in folders.values():
        f["folder"] = display(f["folder"])
    files: dict[str, dict[str, Any]] = {}
    in_doubt: list[dict[str, Any]] = []
    for job in store.jobs_of_current():
        shown = display(job.file.path)
        entry = files.setdefault(job.file.path, {"path": shown, "jobs": {}})
        state = job.state
        info: dict[str, Any] = {"state": state, "step": job.step}
        if job.last_error:
            info["error"] = job.last_error
        if state == "in_doubt":
            doubt = job.data.get("in_doubt", {})
            info["in_doubt"] = {"operation": doubt.get("operation"), "since": _iso(doubt.get("since"))}
            in_doubt.append({"path": shown, "pipeline": job.pipeline, **info["in_doubt"]})
        if job.pipeline == "archive":
            info["versions"] = job.data.get("versions", {})
            if job.data.get("delivery"):
                info["delivery"] = job.data["delivery"]
        if job.pipeline == "analyze" and job.data.get("sidecar"):
            info["sidecar"] = job.data["sidecar"]
        entry["jobs"][job.pipeline] = info
    spent = store.spend_on(utc_day(now))
    spend = {"day": utc_day(now)}
    for service, cap in (caps or {"analysis": 0.0, "processing": 0.0}).items():
        today = spent.get(service, {})
        spend[service] = {
            "minutes_today": round(today.get("seconds", 0.0) / 60, 3),
            "seconds_today": round(today.get("seconds", 0.0), 1),
            "paid_calls_today": today.get("calls", 0),
            "cap_minutes": cap or None,
            "capped_at": _iso(today.get("capped_at")),
        }
    problems = []
    for p in store.problems():
        row = dict(p.__dict__)
        row["path"] = display(p.path)
        problems.append(row)
    return {
        "version": __version__,
        "state_dir": state_dir,
        "counts": store.counts(),
        "folders": list(folders.values()),
        "in_doubt": in_doubt,
        "spend": spend,
        "problems": problems,
        "files": list(files.values()),
        "web": web,
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
    for pipeline, states in report["counts"].items():
        lines.append(f"{pipeline}: " + ", ".join(f"{state} {n}" for state, n in states.items()))
    spend = report.get("spend", {})
    money = []
    for service in ("analysis", "processing"):
        today = spend.get(service)
        if today and (today["minutes_today"] or today["cap_minutes"]):
            cap = f" of {today['cap_minutes']:g} (daily cap)" if today["cap_minutes"] else ""
            calls = today["paid_calls_today"]
            money.append(f"{service} {today['minutes_today']:g}{cap} audio min in {calls} paid calls")
    if money:
        lines.append(f"spent today ({spend['day']} UTC): " + "; ".join(money))
    web = report.get("web")
    if web:
        where = f"running at {web['url']}" if web.get("running") else f"not running ({web.get('problem')})"
        lines.append(f"web page: {where}")
    if report["folders"]:
        lines.append("\nfolders:")
        for f in report["folders"]:
            state = "paused" if f.get("paused") else ("unavailable" if f.get("available") is False else "active")
            mode = f" ({f['mode']}: {f['reason']})" if f.get("mode") else ""
            lines.append(f"  {f['folder']}: {state}{mode}")
    if report.get("in_doubt"):
        lines.append("\nin doubt (sent, answer lost; `watcher retry --in-doubt` sends again, maybe billed twice):")
        for d in report["in_doubt"]:
            lines.append(f"  {d['path']}: {d['pipeline']} {d['operation']} in doubt since {d['since']}")
    if report["problems"]:
        lines.append("\nneeds attention:")
        for p in report["problems"]:
            lines.append(f"  {p['path']}")
            lines.append(
                f"    {p['pipeline']} {p['state']} at {p['step']} ({p['error_code']}, {p['attempts']} attempts"
                f"{_when(p['next_attempt_at'])}): {p['error']}"
            )
    busy = [
        f
        for f in report["files"]
        if all_files or any(j["state"] not in TERMINAL or j.get("versions") for j in f["jobs"].values())
    ]
    if busy:
        lines.append("\nfiles:" if all_files else "\nfiles in progress or archived:")
        for f in busy[: None if all_files else SHOWN_FILES]:
            lines.append(f"  {f['path']}")
            for pipeline, j in f["jobs"].items():
                extra = ""
                if j.get("versions"):
                    extra = " [" + ", ".join(f"{v}: {s}" for v, s in j["versions"].items()) + "]"
                if j.get("delivery"):
                    extra += f" -> {j['delivery']}"
                at = f" at {j['step']}" if j["state"] not in ("done", "skipped") else ""
                lines.append(f"    {pipeline}: {j['state']}{at}{extra}")
        if not all_files and len(busy) > SHOWN_FILES:
            lines.append(f"  ... and {len(busy) - SHOWN_FILES} more (`watcher status --all` or `--json`)")
    return "\n".join(lines)
