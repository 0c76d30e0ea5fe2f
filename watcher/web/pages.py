"""The pages: Jinja2 templates (``templates/``, every value escaped by default), filled and kept live by
``static/app.js`` from the JSON API. The file page is rendered whole, with its loudness plot as inline SVG (no
plotting library, nothing from a CDN); this module turns the API's data into what the templates show."""

from __future__ import annotations

import os
from importlib import resources
from typing import Any
from urllib.parse import quote

import jinja2
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from watcher import __version__
from watcher.names import display
from watcher.store import State

PLOT_WIDTH, PLOT_HEIGHT = 800, 260
FLOOR_LUFS, CEILING_LUFS = -60.0, 0.0
STATES = (State.FAILED, State.IN_DOUBT, State.PENDING, State.DONE, State.SKIPPED, State.GONE)
AUDIO_TYPES = {  # what /audio serves, by extension, and the one type it is served as
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "m4a": "audio/mp4",
    "ogg": "audio/ogg",
    "aiff": "audio/aiff",
    "aif": "audio/aiff",
}

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(resources.files("watcher.web").joinpath("templates"))),
    autoescape=True,  # every value, whatever the template's name
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.globals["version"] = __version__
templates = Jinja2Templates(env=_env)


def render(request: Request, template: str, status_code: int = 200, /, **context: Any) -> Response:
    """``templates/<template>.html`` with ``context``: its ``title`` and ``page`` (``data-page``, read by app.js)."""
    context.setdefault("page", template)
    return templates.TemplateResponse(request, f"{template}.html", context, status_code=status_code)


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def plot(curves: dict[str, Any]) -> dict[str, Any] | None:
    """Momentary and short-term loudness over time as SVG polylines (one point per value), beats as ticks;
    None when the sidecar has no curve."""
    momentary: list[float] = curves["momentary"]
    short: list[float] = curves["short_term"]
    hop = float(curves["hop_seconds"])
    if not momentary and not short:
        return None
    duration = max(len(momentary), len(short), 1) * hop
    top, bottom = 10, PLOT_HEIGHT - 24

    def x(t: float) -> float:
        return 40 + (PLOT_WIDTH - 50) * t / duration

    def y(lufs: float) -> float:
        clamped = min(CEILING_LUFS, max(FLOOR_LUFS, lufs))
        return top + (bottom - top) * (CEILING_LUFS - clamped) / (CEILING_LUFS - FLOOR_LUFS)

    def line(values: list[float], css: str, name: str) -> dict[str, Any]:
        pts = " ".join(f"{x(i * hop):.1f},{y(v):.1f}" for i, v in enumerate(values))
        return {"css": css, "name": name, "count": len(values), "points": pts}

    step = max(1.0, round(duration / 8))
    return {
        "width": PLOT_WIDTH,
        "height": PLOT_HEIGHT,
        "top": top,
        "bottom": bottom,
        "grid": [
            {"y": f"{y(v):.1f}", "label_y": f"{y(v) + 4:.1f}", "label": f"{v:.0f}"}
            for v in (0, -10, -20, -30, -40, -50, -60)
        ],
        "ticks": [{"x": f"{x(i * step):.1f}", "label": f"{i * step:g}s"} for i in range(int(duration // step) + 1)],
        "beats": [f"{x(b):.1f}" for b in curves["beats"] if 0 <= b <= duration],
        "beat_count": len(curves["beats"]),
        "lines": [line(short, "short", "short_term"), line(momentary, "momentary", "momentary")],
    }


def file_context(info: dict[str, Any]) -> dict[str, Any]:
    """What the file page shows: key, tempo, loudness, the plot, delivered versions as players, its jobs."""
    s = info["summary"]
    path = display(info["path"])
    retry_label = None
    if info["state"] in (State.FAILED, State.IN_DOUBT, State.PENDING):
        retry_label = "Send again (may be billed twice)" if info["state"] == State.IN_DOUBT else "Retry"
    return {
        "title": os.path.basename(path),
        "path": path,
        "name": os.path.basename(path),
        "state": info["state"],
        "retry_label": retry_label,
        "key": f"{s['key']} {s['scale'] or ''}".strip() if s["key"] else "–",
        "strength": f"(strength {s['key_strength']:.2f})" if s["key_strength"] is not None else "",
        "bpm": _fmt(s["bpm"], " BPM"),
        "lufs": _fmt(s["integrated_lufs"], " LUFS"),
        "lra": _fmt(s["loudness_range"], " LU"),
        "plot": plot(info["curves"]),
        "players": players(info.get("delivery") or {}),
        "jobs": [
            {**j, "versions": ", ".join(f"{k}: {v}" for k, v in (j["data"].get("versions") or {}).items())}
            for j in info["jobs"]
        ],
        "problems": info["problems"],
    }


def players(delivery: dict[str, Any]) -> list[dict[str, Any]]:
    """One audio player with a download link per delivered audio file (the formats /audio serves)."""
    out = []
    for f in delivery.get("files", []):
        if f.get("format") not in AUDIO_TYPES:
            continue
        out.append({"version": f.get("version"), "path": f.get("path"), "src": "/audio?path=" + quote(f["absolute"])})
    return out
