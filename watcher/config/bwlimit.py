"""The ``bwlimit`` setting in rclone's ``--bwlimit`` syntax, parsed into a timetable of rates.

``"off"`` (or a zero rate: ``"0"``, ``"0k"``, as rclone); a rate (``"512k"``, ``"4M"``: KiB/s by default, suffixes
B, K, M, G in powers of 1024, as rclone); separate upload and download rates (``"4M:off"``); or a timetable of
either by local time of day (``"08:00,512k 12:00,1M 19:00,off"``, entries separated by spaces or semicolons, in
any order: each rate holds from its time until the next; before the first time of the day the last entry of the
previous day holds). Refused, naming what is expected: an empty value or side (rclone refuses it too), a time
given twice (rclone would silently keep the later entry), weekdays (rclone's ``Mon-08:00``: not supported here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Direction = Literal["up", "down"]
UNITS = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_RATE = re.compile(r"^(?P<number>\d+(?:\.\d+)?)(?P<unit>[bkmg])?(?:i?b?)?(?:/s)?$", re.IGNORECASE)
_TIME = re.compile(r"^(?P<hour>[01]?\d|2[0-3]):(?P<minute>[0-5]\d)$")


@dataclass(frozen=True)
class Rate:
    """Bytes per second upward (request bodies) and downward (response bodies); None is no limit."""

    up: float | None
    down: float | None

    def of(self, direction: Direction) -> float | None:
        return self.up if direction == "up" else self.down

    def __str__(self) -> str:
        def one(value: float | None) -> str:
            return "off" if value is None else _human(value)

        return one(self.up) if self.up == self.down else f"{one(self.up)}:{one(self.down)}"


OFF = Rate(None, None)


@dataclass(frozen=True)
class Timetable:
    """Rates by minute of the local day, sorted; one entry at minute 0 for a plain rate."""

    entries: tuple[tuple[int, Rate], ...]

    @property
    def is_off(self) -> bool:
        return all(rate == OFF for _, rate in self.entries)

    def at(self, minute_of_day: int) -> Rate:
        """The rate in force at ``minute_of_day`` (0-1439): the last entry at or before it, else the day's last."""
        current = self.entries[-1][1]
        for start, rate in self.entries:
            if start > minute_of_day:
                break
            current = rate
        return current

    def __str__(self) -> str:
        if len(self.entries) == 1 and self.entries[0][0] == 0:
            return str(self.entries[0][1])
        return " ".join(f"{m // 60:02d}:{m % 60:02d},{rate}" for m, rate in self.entries)


def _human(value: float) -> str:
    for suffix, size in (("G", UNITS["g"]), ("M", UNITS["m"]), ("k", UNITS["k"])):
        if value >= size and value % size == 0:
            return f"{int(value // size)}{suffix}"
    return f"{value:g}B"


def _one_rate(text: str) -> float | None:
    """One direction's rate in bytes per second; None for no limit (``off``, or zero in any unit, as rclone)."""
    text = text.strip()
    if not text:
        raise ValueError("a rate is empty: write off for no limit, or a rate such as 512k or 4M")
    if text.lower() == "off":
        return None
    match = _RATE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a rate: write it as rclone does, e.g. 512k, 4M, 1.5M or off")
    unit = (match["unit"] or "k").lower()
    value = float(match["number"]) * UNITS[unit]
    if value == 0:
        return None  # rclone's default, 0, is no limit, whatever the unit
    if value < 1024:
        raise ValueError(f"{text!r} is under 1 KiB/s: too slow for any request to finish; use off or a higher rate")
    return value


def parse_rate(text: str) -> Rate:
    """``"4M"``, ``"off"`` or ``"UP:DOWN"`` (``"4M:off"``)."""
    if ":" in text:
        up, _, down = text.partition(":")
        if ":" in down:
            raise ValueError(f"{text!r}: one colon at most, between the upload and the download rate")
        for side, value in (("upload", up), ("download", down)):
            if not value.strip():
                raise ValueError(f"{text!r}: the {side} rate is empty: write off for no limit there, or e.g. 512k")
        return Rate(_one_rate(up), _one_rate(down))
    both = _one_rate(text)
    return Rate(both, both)


def parse_bwlimit(text: str) -> Timetable:
    """A whole ``bwlimit`` value: one rate, or a timetable of ``HH:MM,RATE`` entries separated by spaces or
    semicolons (see the module for what is refused)."""
    parts = text.replace(";", " ").split()
    if not parts:
        raise ValueError(f"{text!r} is empty: write off for no limit, a rate such as 4M, or a timetable")
    if len(parts) == 1 and "," not in parts[0] and not _TIME.match(parts[0]):
        return Timetable(((0, parse_rate(parts[0])),))
    entries: dict[int, Rate] = {}
    for part in parts:
        when, comma, rate = part.partition(",")
        match = _TIME.match(when)
        if not comma or match is None:
            weekday = " (weekdays, as rclone's Mon-08:00, are not supported: each entry holds every day)"
            raise ValueError(
                f"{part!r}: a timetable entry is HH:MM,RATE (e.g. 08:00,512k), entries apart by spaces or semicolons"
                + (weekday if "-" in when else "")
            )
        if not rate.strip():
            raise ValueError(f"{part!r}: the rate is empty: write off for no limit from {when}, or e.g. 512k")
        minute = int(match["hour"]) * 60 + int(match["minute"])
        if minute in entries:
            raise ValueError(f"{text!r}: {when} appears twice in the timetable: give each time of day one rate")
        entries[minute] = parse_rate(rate)
    return Timetable(tuple(sorted(entries.items())))
