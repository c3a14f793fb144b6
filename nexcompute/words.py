"""Numbers in a student's words: plurals and durations, written once for pages and mails.

``static/js/dashboard.js`` mirrors :func:`plural` (its receipt line; the browser test reads
"1 process killed" there).
"""

from __future__ import annotations

import datetime as dt
import zoneinfo


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 process``, ``2 processes``, ``0 files``."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def duration(seconds: float) -> str:
    """A session's length as a student says it: ``26 s``, ``4 min``, ``1 h 5 min``."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total} s"
    minutes = round(total / 60)
    hours, minutes = divmod(minutes, 60)
    if not hours:
        return f"{minutes} min"
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def zone(name: str, fallback: zoneinfo.ZoneInfo | None = None) -> zoneinfo.ZoneInfo:
    """The zone ``name`` (an IANA key), else ``fallback``, else UTC."""
    if name:
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            pass
    return fallback or zoneinfo.ZoneInfo("UTC")


def clock(at: dt.datetime, tz: zoneinfo.ZoneInfo, *, date: bool = False) -> str:
    """``13:02 CET`` (or ``2026-12-02 13:02 CET``): a time in ``tz``, the zone named, so a
    reader elsewhere is never left guessing."""
    local = at.astimezone(tz)
    return f"{local:%Y-%m-%d %H:%M %Z}" if date else f"{local:%H:%M %Z}"
