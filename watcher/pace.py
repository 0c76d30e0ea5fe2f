"""The backlog's pace: per pipeline the files waiting, the rate they finished at over the last minutes, and
when the backlog will be done at that rate, knowing the daily caps (a capped day ends at UTC midnight)."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any, Protocol

from watcher.config import Settings
from watcher.store import State, next_utc_midnight, utc_day

WINDOW = 900.0  # the rate is measured over the last 15 minutes
MIN_WINDOW = 60.0  # or since the daemon started, when that is shorter, but never less than a minute
MAX_DAYS = 3660  # an ETA further than ten years is "not in sight"
BUDGETS = {"analyze": "analysis", "archive": "processing"}  # the gate's budget each pipeline spends


class PaceSource(Protocol):
    """What the pace reads from the store: kept counts and two index ranges, never every job."""

    def counts(self) -> dict[str, dict[str, int]]: ...

    def finished_since(self, since: float) -> dict[str, int]: ...

    def spent_since(self, since: float) -> dict[str, float]: ...

    def spend_on(self, day: str) -> dict[str, dict[str, Any]]: ...


def caps_of(settings: Settings) -> dict[str, float]:
    """Each budget's daily cap in audio minutes (0: none)."""
    return {"analysis": settings.analysis.daily_audio_minutes, "processing": settings.archive.daily_audio_minutes}


def eta(
    waiting: int,
    rate: float,
    now: float,
    *,
    cap: float = 0.0,
    spent_today: float = 0.0,
    per_file: float = 0.0,
) -> tuple[float | None, bool]:
    """When ``waiting`` files are done at ``rate`` files a second, and whether a daily cap delays it.

    ``cap`` is the budget's audio seconds a UTC day (0: none), ``spent_today`` what today took already and
    ``per_file`` the audio seconds a file costs; once a day's cap is spent the rest waits for the next UTC day.
    None when nothing is finishing (rate 0) or the end is not in sight.
    """
    if waiting <= 0:
        return now, False
    if rate <= 0:
        return None, False
    limited = cap > 0 and per_file > 0
    left, t, budget, capped = float(waiting), now, cap - spent_today, False
    for _ in range(MAX_DAYS):
        day_end = next_utc_midnight(t)
        can = rate * (day_end - t)
        if limited and max(0.0, budget) / per_file < min(can, left):
            can, capped = max(0.0, budget) / per_file, True  # the cap ends this day's work early
        if left <= can:
            return t + left / rate, capped
        left -= can
        t, budget = day_end, cap
    return None, capped


def backlog(
    store: PaceSource, caps: dict[str, float], now: float | None = None, *, since: float | None = None
) -> dict[str, dict[str, Any]]:
    """Per pipeline: ``waiting`` (pending jobs), ``finished_recently`` and ``rate_per_minute`` over ``WINDOW``
    (or since ``since``, the daemon's start, when shorter: a daemon up for a minute is not judged by 15),
    ``eta`` (ISO time, None: unknown), ``eta_seconds`` and ``capped`` (a daily cap pushes it to a later day).
    ``caps`` gives each budget's daily cap in audio minutes (0: none)."""
    now = time.time() if now is None else now
    window = WINDOW if since is None else max(MIN_WINDOW, min(WINDOW, now - since))
    counts = store.counts()
    finished = store.finished_since(now - window)
    spent = store.spent_since(now - window)
    today = store.spend_on(utc_day(now))
    out: dict[str, dict[str, Any]] = {}
    for pipeline, budget in BUDGETS.items():
        if pipeline not in counts:
            continue
        waiting = counts[pipeline].get(State.PENDING, 0)
        done = finished.get(pipeline, 0)
        rate = done / window
        cap = caps.get(budget, 0.0) * 60
        per_file = spent.get(budget, 0.0) / done if done else 0.0
        spent_today = float(today.get(budget, {}).get("seconds", 0.0))
        if today.get(budget, {}).get("capped_at"):
            spent_today = max(spent_today, cap)
        when, capped = eta(waiting, rate, now, cap=cap, spent_today=spent_today, per_file=per_file)
        out[pipeline] = {
            "waiting": waiting,
            "finished_recently": done,
            "window_minutes": round(window / 60, 1),
            "rate_per_minute": round(rate * 60, 2),
            "eta": _iso(when) if waiting and when is not None else None,
            "eta_seconds": round(when - now) if when is not None else None,
            "capped": capped,
        }
    return out


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def describe(pipeline: str, b: dict[str, Any]) -> str:
    """One line for people: waiting, rate and ETA (or why it is unknown)."""
    line = f"{pipeline}: {b['waiting']} waiting, {b['rate_per_minute']:g}/min over the last {b['window_minutes']:g} min"
    if not b["waiting"]:
        return line + ", nothing left"
    if b["eta"] is None:
        why = "nothing finished lately" if not b["finished_recently"] else "not in sight"
        return line + f", done: unknown ({why})"
    left = int(b["eta_seconds"] or 0)
    span = (
        f"{left // 86400} d {left % 86400 // 3600} h" if left >= 86400 else f"{left // 3600} h {left % 3600 // 60} min"
    )
    cap = " (held back by the daily cap)" if b["capped"] else ""
    return line + f", done in about {span}, at {b['eta']}{cap}"
