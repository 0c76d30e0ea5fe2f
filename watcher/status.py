"""`watcher status`: what the store knows, gathered into one report and rendered for people or scripts."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable
from typing import Any, Protocol

from watcher import __version__
from watcher.config import Settings
from watcher.names import display
from watcher.pace import backlog, caps_of, describe
from watcher.store import TERMINAL, Job, Listed, Problem, State, utc_day

SHOWN_FILES = 40
# The shape of `watcher status --json`, raised when a key is renamed or removed (an added key does not raise it).
# 2: the vocabulary pass renamed nodes[].owner to nodes[].holder; the old name is still given until 0.4.0.
SCHEMA_VERSION = 2
RENAMED_NODE_KEYS = {"owner": "holder"}  # old -> new: both are given for one release (deprecated in 0.3.0)


class StatusSource(Protocol):
    def counts(self) -> dict[str, dict[str, int]]: ...

    def problems(self, limit: int | None = None) -> list[Problem]: ...

    def jobs_of_current(self) -> list[Job]: ...

    def open_files(self, limit: int) -> list[Listed]: ...

    def finished_since(self, since: float) -> dict[str, int]: ...

    def spent_since(self, since: float) -> dict[str, float]: ...

    def folder_states(self) -> list[dict[str, Any]]: ...

    def spend_on(self, day: str) -> dict[str, dict[str, Any]]: ...

    def nodes(self) -> list[dict[str, Any]]: ...


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
    daemon: dict[str, Any] | None = None,
    brief: bool = False,
) -> dict[str, Any]:
    """The whole report as plain data (the JSON output); ``configured`` folders are listed even if never seen.

    ``caps`` gives each budget's daily cap in audio minutes (0: none), for the ``spend`` and ``backlog`` sections;
    ``web`` says whether the daemon's page runs (``running``, ``url``, ``problem``), when known; ``daemon`` is
    the running daemon's own account (``pid``, ``since``, ``paused_services``, ``backfill``), None when none runs.
    ``brief``: only the files with work open and the first problems (``SHOWN_FILES`` of each), read through
    indexes, so its cost does not grow with the files done; otherwise every current file.
    """
    now = time.time() if now is None else now
    caps = caps or {"analysis": 0.0, "processing": 0.0}
    if brief:
        files, in_doubt, adopted = _files(j for e in store.open_files(SHOWN_FILES + 1) for j in e.jobs)
        problems = store.problems(limit=SHOWN_FILES + 1)
    else:
        files, in_doubt, adopted = _files(store.jobs_of_current())
        problems = store.problems()
    return {
        "schema_version": SCHEMA_VERSION,
        "version": __version__,
        "state_dir": state_dir,
        "daemon": daemon,
        "nodes": _nodes(store),
        "counts": store.counts(),
        "backlog": backlog(store, caps, now, since=_started(daemon)),
        "folders": _folders(store, configured or []),
        "in_doubt": in_doubt,
        "adopted": adopted,
        "spend": _spend(store, caps, now),
        "problems": [{**p.__dict__, "path": display(p.path)} for p in problems],
        "files": files,
        "brief": brief,
        "web": web,
        "store_unreachable": None,
    }


def _started(daemon: dict[str, Any] | None) -> float | None:
    """When the running daemon started (its report's ``since``), None when none runs or it does not say."""
    since = (daemon or {}).get("since")
    if not isinstance(since, str):
        return None
    try:
        return dt.datetime.fromisoformat(since.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def collect_for(
    store: StatusSource,
    settings: Settings,
    *,
    daemon: dict[str, Any] | None = None,
    web: dict[str, Any] | None = None,
    brief: bool = False,
) -> dict[str, Any]:
    """:func:`collect` with what ``settings`` say: the state folder, the folders configured, the daily caps."""
    folders = [str(f.path) for f in settings.folders]
    return collect(
        store, state_dir=str(settings.state_dir), configured=folders, caps=caps_of(settings), web=web, daemon=daemon,
        brief=brief,
    )  # fmt: skip


def _nodes(store: StatusSource) -> list[dict[str, Any]]:
    """Every machine using a shared store (name, version, last heartbeat, jobs held); none for SQLite."""
    return [renamed({**n, "last_heartbeat": _iso(n["last_heartbeat"])}, RENAMED_NODE_KEYS) for n in store.nodes()]


def renamed(entry: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    """``entry`` with each renamed key (``renames``: old -> new) under its new name and, for scripts written
    against an earlier release, under its old one too."""
    out = dict(entry)
    for old, new in renames.items():
        if new in out or old in out:
            out[new] = out[old] = out[new] if new in out else out[old]
    return out


def node_of(holder: str) -> str:
    """The node name in a lease holder (``node:pid:started``)."""
    return holder.rsplit(":", 2)[0]


def _folders(store: StatusSource, configured: list[str]) -> list[dict[str, Any]]:
    folders = {f["folder"]: f for f in store.folder_states()}
    for path in configured:
        folders.setdefault(path, {"folder": path, "paused": False, "mode": None, "reason": None, "available": None})
    return [{**f, "folder": display(f["folder"]), "state": folder_state(f)} for f in folders.values()]


def folder_state(f: dict[str, Any]) -> str:
    """``paused``, ``missing`` (never seen: a wrong path), ``unavailable`` (seen, now gone: an unmounted share),
    or ``active`` (also when no daemon has looked at it yet)."""
    if f.get("paused"):
        return "paused"
    if f.get("mode") == "missing":
        return "missing"
    if f.get("available") is False:
        return "unavailable"
    return "active"


def _files(jobs: Iterable[Job]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """The files of these jobs with their jobs, the jobs held in doubt, and how many jobs per pipeline were done by
    adopting paid work found on disk (a sidecar's results, a verified delivery) instead of paying again."""
    files: dict[str, dict[str, Any]] = {}
    in_doubt: list[dict[str, Any]] = []
    adopted = {"analyze": 0, "archive": 0}
    for job in jobs:
        if job.data.get("adopted") and job.state == State.DONE:
            adopted[job.pipeline] = adopted.get(job.pipeline, 0) + 1
        shown = display(job.file.path)
        info = job_info(job)
        if job.state == State.IN_DOUBT:
            in_doubt.append({"path": shown, "pipeline": job.pipeline, **info["in_doubt"]})
        files.setdefault(job.file.path, {"path": shown, "jobs": {}})["jobs"][job.pipeline] = info
    return list(files.values()), in_doubt, adopted


def job_info(job: Job) -> dict[str, Any]:
    """One job as the report shows it: state, step, node, error, doubt, versions and the paths it wrote."""
    info: dict[str, Any] = {"state": job.state, "step": job.step}
    if job.seen_holder:  # a shared store names the node holding the job's lease
        info["node"] = node_of(job.seen_holder)
    if job.last_error:
        info["error"] = job.last_error
    if job.state == State.IN_DOUBT:
        doubt = job.data.get("in_doubt", {})
        info["in_doubt"] = {"operation": doubt.get("operation"), "since": _iso(doubt.get("since"))}
    if job.data.get("versions"):
        info["versions"] = job.data["versions"]
    for key in ("delivery", "sidecar"):  # paths named after the file: shown as text whatever its bytes
        if job.data.get(key):
            info[key] = display(job.data[key])
    if job.pipeline == "archive":
        info.setdefault("versions", {})
    return info


def _spend(store: StatusSource, caps: dict[str, float], now: float) -> dict[str, Any]:
    """Today's audio minutes and paid calls per budget, against each one's cap."""
    spent = store.spend_on(utc_day(now))
    spend: dict[str, Any] = {"day": utc_day(now)}
    for budget, cap in caps.items():
        today = spent.get(budget, {})
        spend[budget] = {
            "minutes_today": round(today.get("seconds", 0.0) / 60, 3),
            "seconds_today": round(today.get("seconds", 0.0), 1),
            "paid_calls_today": today.get("calls", 0),
            "cap_minutes": cap or None,
            "capped_at": _iso(today.get("capped_at")),
        }
    return spend


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return ""
    return "; next attempt " + dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def render(report: dict[str, Any], *, all_files: bool = False) -> str:
    """The report for a terminal: counts, spend, folders, doubts, problems with reasons, files in progress."""
    lines = [f"watcher {report['version']}, state in {report['state_dir']}"]
    lines += _render_daemon(report.get("daemon"))
    if report.get("store_unreachable"):
        out = report["store_unreachable"]
        lines.append(f"store unreachable since {out['unreachable_since']} ({out['error']}): {out.get('next', '')}")
    elif not report["counts"]:
        lines.append("no files recorded yet")
    for pipeline, states in report["counts"].items():
        lines.append(f"{pipeline}: " + ", ".join(f"{state} {n}" for state, n in states.items()))
    backlog = report.get("backlog") or {}
    if any(b["waiting"] for b in backlog.values()):
        lines += ["backlog:"] + [f"  {describe(pipeline, b)}" for pipeline, b in backlog.items()]
    lines += _render_spend(report.get("spend", {}))
    adopted = report.get("adopted") or {}
    if any(adopted.values()):
        lines.append(
            f"adopted from sidecars: {adopted.get('analyze', 0)} analysed, "
            f"{adopted.get('archive', 0)} delivered (no request made)"
        )
    web = report.get("web")
    if web:
        where = f"running at {web['url']}" if web.get("running") else f"not running ({web.get('problem')})"
        lines.append(f"web page: {where}")
    if report.get("nodes"):
        lines.append("\nnodes:")
        for n in report["nodes"]:
            lines.append(
                f"  {n['name']} (watcher {n['version']}): last heartbeat {n['last_heartbeat']} "
                f"({n['seconds_since_heartbeat']:g} s ago), {n['jobs_held']} job(s) held"
            )
    if report["folders"]:
        lines.append("\nfolders:")
        for f in report["folders"]:
            state = f.get("state") or folder_state(f)
            watched = f.get("mode") in ("native", "polling")
            mode = f" ({f['mode']}: {f['reason']})" if watched else ""
            if not watched and f.get("reason"):  # e.g. owned by another store, or missing
                mode = f" ({f['reason']})"
            lines.append(f"  {f['folder']}: {state}{mode}")
    if report.get("in_doubt"):
        lines.append("\nin doubt (sent, answer lost; `watcher retry --in-doubt` sends again, maybe billed twice):")
        for d in report["in_doubt"]:
            lines.append(f"  {d['path']}: {d['pipeline']} {d['operation']} in doubt since {d['since']}")
    brief = bool(report.get("brief"))
    if report["problems"]:
        lines.append("\nneeds attention:")
        for p in report["problems"][: SHOWN_FILES if brief else None]:
            lines.append(f"  {p['path']}")
            lines.append(
                f"    {p['pipeline']} {p['state']} at {p['step']} ({p['error_code']}, {p['attempts']} attempts"
                f"{_when(p['next_attempt_at'])}): {p['error']}"
            )
    if brief and len(report["problems"]) > SHOWN_FILES:
        lines.append("  ... and more (`watcher status --all`, or the page)")
    return "\n".join(lines + _render_files(report["files"], all_files=all_files, brief=brief))


def _render_daemon(daemon: dict[str, Any] | None) -> list[str]:
    """Whether a daemon runs on this state folder, since when, and what it holds back."""
    if not daemon:
        return ["daemon: not running (this is what the store says)"]
    lines = [f"daemon: running, pid {daemon['pid']}, since {daemon['since']}"]
    for service, why in (daemon.get("paused_services") or {}).items():
        lines.append(f"  {service} service paused: {why}")
    backfill = daemon.get("backfill") or {}
    if backfill.get("queued"):
        lines.append(f"  back-fill: {backfill['queued']} job(s) queued ({backfill.get('what', '')})")
    if backfill.get("waiting"):
        lines.append(
            f"  back-fill waiting for confirmation: {backfill['waiting']} job(s), about "
            f"{backfill.get('minutes', 0):g} audio minutes (`watcher backfill --yes` starts it)"
        )
    return lines


def _render_spend(spend: dict[str, Any]) -> list[str]:
    money = []
    for budget in ("analysis", "processing"):
        today = spend.get(budget)
        if today and (today["minutes_today"] or today["cap_minutes"]):
            cap = f" of {today['cap_minutes']:g} (daily cap)" if today["cap_minutes"] else ""
            calls = today["paid_calls_today"]
            money.append(f"{budget} {today['minutes_today']:g}{cap} audio min in {calls} paid calls")
    return [f"spent today ({spend['day']} UTC): " + "; ".join(money)] if money else []


def _render_files(files: list[dict[str, Any]], *, all_files: bool, brief: bool = False) -> list[str]:
    busy = [
        f
        for f in files
        if all_files or any(j["state"] not in TERMINAL or j.get("versions") for j in f["jobs"].values())
    ]
    if not busy:
        return []
    lines = ["\nfiles:" if all_files else "\nfiles in progress or archived:"]
    for f in busy[: None if all_files else SHOWN_FILES]:
        lines.append(f"  {f['path']}")
        for pipeline, j in f["jobs"].items():
            extra = ""
            if j.get("versions"):
                extra = " [" + ", ".join(f"{v}: {s}" for v, s in j["versions"].items()) + "]"
            if j.get("delivery"):
                extra += f" -> {j['delivery']}"
            at = f" at {j['step']}" if j["state"] not in (State.DONE, State.SKIPPED) else ""
            on = f" on {j['node']}" if j.get("node") else ""
            lines.append(f"    {pipeline}: {j['state']}{at}{on}{extra}")
    if not all_files and len(busy) > SHOWN_FILES:
        more = "more" if brief else f"{len(busy) - SHOWN_FILES} more"
        lines.append(f"  ... and {more} (`watcher status --all` or `--json`)")
    return lines
