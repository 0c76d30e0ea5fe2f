"""The pages: HTML built here (escaped), filled and kept live by ``static/app.js`` from the JSON API. The file
page is rendered whole, with its loudness plot as inline SVG (no plotting library, nothing from a CDN)."""

from __future__ import annotations

import html
import os
from typing import Any
from urllib.parse import quote

from watcher import __version__

PLOT_WIDTH, PLOT_HEIGHT = 800, 260
FLOOR_LUFS, CEILING_LUFS = -60.0, 0.0


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def layout(title: str, body: str, *, page: str, attrs: str = "") -> str:
    """A whole page: the shared head (stylesheet, script, phone viewport), navigation and ``body``."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)} · watcher</title>
<link rel="stylesheet" href="/static/style.css">
<script src="/static/app.js" defer></script>
</head><body data-page="{page}" {attrs}>
<header><a class="brand" href="/">watcher</a><nav><a href="/">Overview</a> <a href="/files">Files</a></nav>
<span id="live" class="live" title="live updates">offline</span></header>
<main>{body}</main>
<footer>watcher {esc(__version__)}</footer>
</body></html>"""


def overview() -> str:
    body = """<h1>Overview</h1>
<section id="attention"><h2>Needs attention</h2><div id="problems" class="cards">loading…</div></section>
<section><h2>Folders</h2><table id="folders" class="grid"><thead><tr><th>Folder</th><th>Watching</th>
<th>State</th><th></th></tr></thead><tbody></tbody></table></section>
<section><h2>Steps</h2><div id="counts" class="cards"></div></section>
<section><h2>Spend today</h2><div id="spend" class="cards"></div></section>
<section id="nodes-section" hidden><h2>Nodes</h2><ul id="nodes"></ul></section>
<section><h2>Files</h2><table id="files" class="grid"><thead><tr><th>File</th><th>State</th><th>Key</th>
<th>BPM</th><th>LUFS</th></tr></thead><tbody></tbody></table></section>"""
    return layout("Overview", body, page="overview")


def file_list(folders: list[str]) -> str:
    options = "".join(f'<option value="{esc(f)}">{esc(f)}</option>' for f in folders)
    states = "".join(
        f'<option value="{s}">{s}</option>' for s in ("failed", "in_doubt", "pending", "done", "skipped", "gone")
    )
    body = f"""<h1>Files</h1>
<form id="filters" class="filters">
<input name="q" type="search" placeholder="search paths" aria-label="search paths">
<select name="state" aria-label="state"><option value="">any state</option>{states}</select>
<select name="folder" aria-label="folder"><option value="">any folder</option>{options}</select>
<input name="key" placeholder="key (A minor)" aria-label="key" size="10">
<input name="bpm_min" type="number" placeholder="BPM from" aria-label="BPM from" step="any">
<input name="bpm_max" type="number" placeholder="to" aria-label="BPM to" step="any">
<button type="submit">Filter</button></form>
<p id="total"></p>
<table id="files" class="grid"><thead><tr><th>File</th><th>State</th><th>Key</th><th>BPM</th><th>LUFS</th>
</tr></thead><tbody></tbody></table>
<p class="pager"><button id="prev" type="button">‹ previous</button> <span id="pageno"></span>
<button id="next" type="button">next ›</button></p>"""
    return layout("Files", body, page="files")


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def plot(curves: dict[str, Any]) -> str:
    """Momentary and short-term loudness over time as SVG polylines (one point per value), beats as ticks."""
    momentary: list[float] = curves["momentary"]
    short: list[float] = curves["short_term"]
    hop = float(curves["hop_seconds"])
    if not momentary and not short:
        return '<p class="muted">No loudness curve in the sidecar.</p>'
    duration = max(len(momentary), len(short), 1) * hop
    top, bottom = 10, PLOT_HEIGHT - 24

    def x(t: float) -> float:
        return 40 + (PLOT_WIDTH - 50) * t / duration

    def y(lufs: float) -> float:
        clamped = min(CEILING_LUFS, max(FLOOR_LUFS, lufs))
        return top + (bottom - top) * (CEILING_LUFS - clamped) / (CEILING_LUFS - FLOOR_LUFS)

    def line(values: list[float], css: str, name: str) -> str:
        pts = " ".join(f"{x(i * hop):.1f},{y(v):.1f}" for i, v in enumerate(values))
        return f'<polyline class="{css}" data-series="{name}" data-count="{len(values)}" points="{pts}"/>'

    grid = "".join(
        f'<line class="grid" x1="40" x2="{PLOT_WIDTH - 10}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>'
        f'<text class="axis" x="36" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>'
        for v in (0, -10, -20, -30, -40, -50, -60)
    )
    step = max(1.0, round(duration / 8))
    ticks = "".join(
        f'<text class="axis" x="{x(i * step):.1f}" y="{PLOT_HEIGHT - 6}" text-anchor="middle">{i * step:g}s</text>'
        for i in range(int(duration // step) + 1)
    )
    beats = "".join(
        f'<line class="beat" x1="{x(b):.1f}" x2="{x(b):.1f}" y1="{top}" y2="{bottom}"/>'
        for b in curves["beats"]
        if 0 <= b <= duration
    )
    return (
        f'<svg id="loudness-plot" class="plot" viewBox="0 0 {PLOT_WIDTH} {PLOT_HEIGHT}" role="img" '
        f'aria-label="loudness over time" data-beats="{len(curves["beats"])}">'
        f'{grid}{ticks}<g class="beats">{beats}</g>'
        f"{line(short, 'short', 'short_term')}{line(momentary, 'momentary', 'momentary')}</svg>"
        '<p class="legend"><span class="momentary">momentary</span> <span class="short">short-term</span> '
        '<span class="beat">beats</span> (LUFS over time)</p>'
    )


def file_page(info: dict[str, Any]) -> str:
    """One file: key, tempo, loudness, the plot, delivered versions as players, and its job history."""
    s = info["summary"]
    key = f"{s['key']} {s['scale'] or ''}".strip() if s["key"] else "–"
    strength = f" (strength {s['key_strength']:.2f})" if s["key_strength"] is not None else ""
    retry_button = ""
    if info["state"] in ("failed", "in_doubt", "pending"):
        label = "Send again (may be billed twice)" if info["state"] == "in_doubt" else "Retry"
        retry_button = f'<button id="retry" type="button" data-path="{esc(info["path"])}">{label}</button>'
    players = _players(info.get("delivery") or {})
    jobs = _job_rows(info)
    body = f"""<h1 class="path">{esc(os.path.basename(info["path"]))}</h1>
<p class="muted">{esc(info["path"])}</p>
<p>State: <strong id="state" class="state-{esc(info["state"])}">{esc(info["state"])}</strong> {retry_button}</p>
<div class="cards">
<div class="card"><div class="label">Key</div><div id="key" class="value">{esc(key)}</div>
<div class="muted">{esc(strength)}</div></div>
<div class="card"><div class="label">Tempo</div><div id="bpm" class="value">{_fmt(s["bpm"], " BPM")}</div></div>
<div class="card"><div class="label">Integrated loudness</div>
<div id="lufs" class="value">{_fmt(s["integrated_lufs"], " LUFS")}</div></div>
<div class="card"><div class="label">Loudness range</div>
<div id="lra" class="value">{_fmt(s["loudness_range"], " LU")}</div></div>
</div>
<section><h2>Loudness over time</h2>{plot(info["curves"])}</section>
<section><h2>Delivered versions</h2>{
        "<ul id='players'>" + "".join(players) + "</ul>" if players else '<p class="muted">Nothing delivered yet.</p>'
    }</section>
<section><h2>Jobs</h2><table id="jobs" class="grid"><thead><tr><th>Pipeline</th><th>State</th><th>Step</th>
<th>Attempts</th><th>Details</th></tr></thead><tbody>{"".join(jobs)}</tbody></table></section>"""
    return layout(os.path.basename(info["path"]), body, page="file", attrs=f'data-path="{esc(info["path"])}"')


def _players(delivery: dict[str, Any]) -> list[str]:
    """One audio player with a download link per delivered audio file."""
    players = []
    for f in delivery.get("files", []):
        if f.get("format") not in ("wav", "flac", "mp3", "m4a", "ogg", "aiff", "aif"):
            continue
        src = "/audio?path=" + quote(f["absolute"])
        players.append(
            f'<li><span class="version">{esc(f.get("version"))}</span> {esc(f.get("path"))}'
            f'<audio controls preload="metadata" src="{esc(src)}"></audio>'
            f'<a href="{esc(src)}&amp;download=1" download>download</a></li>'
        )
    return players


def _job_rows(info: dict[str, Any]) -> list[str]:
    """The job table's rows: each job with its state, step, attempts, versions and error; then the problems."""
    rows = []
    for j in info["jobs"]:
        error = f'<div class="error">{esc(j["error_code"])}: {esc(j["error"])}</div>' if j["error"] else ""
        versions = j["data"].get("versions") or {}
        extra = ", ".join(f"{esc(k)}: {esc(v)}" for k, v in versions.items())
        rows.append(
            f'<tr class="state-{esc(j["state"])}"><td>{esc(j["pipeline"])}</td><td>{esc(j["state"])}</td>'
            f"<td>{esc(j['step'])}</td><td>{j['attempts']}</td><td>{extra}{error}</td></tr>"
        )
    for p in info["problems"]:
        rows.append(
            f'<tr class="state-{esc(p["state"])}"><td>{esc(p["pipeline"])}</td><td colspan="4" class="error">'
            f"{esc(p['error_code'])}: {esc(p['error'])}</td></tr>"
        )
    return rows


def not_found(detail: str) -> str:
    return layout("Not found", f"<h1>Not found</h1><p>{esc(detail)}</p>", page="none")
