"""Numbers for people: bytes as GiB/MiB, seconds as "1 h 5 min"."""

from __future__ import annotations

from typing import Any


def human_bytes(value: Any) -> str:
    if value is None or value == "":
        return "–"
    n = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def human_duration(seconds: Any) -> str:
    if seconds is None or seconds == "":
        return "–"
    s = round(float(seconds))
    if s < 60:
        return f"{s} s"
    minutes, s = divmod(s, 60)
    if minutes < 60:
        return f"{minutes} min {s} s" if s else f"{minutes} min"
    h, minutes = divmod(minutes, 60)
    return f"{h} h {minutes} min" if minutes else f"{h} h"
