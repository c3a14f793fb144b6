"""Charts drawn on the server as inline SVG: no script, no CDN, and they print.

Each chart is an ``<svg>`` with ``data-chart`` naming it; each mark carries ``data-value`` (what
it shows) and a ``<title>`` (the tooltip and what a screen reader says).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from html import escape

from django.utils.safestring import SafeString, mark_safe

WEEKDAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
# Readable in grey print too: the series differ in lightness, not only in hue.
SERIES = {"available": "#c9d7e8", "leased": "#6f97c6", "used": "#1f3f6b"}


def _svg(name: str, width: int, height: int, body: list[str], label: str) -> SafeString:
    return mark_safe(
        f'<svg xmlns="http://www.w3.org/2000/svg" data-chart="{escape(name)}" role="img" '
        f'aria-label="{escape(label)}" viewBox="0 0 {width} {height}" '
        f'width="100%" style="max-width:{width}px" class="nx-chart">' + "".join(body) + "</svg>"
    )


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000):
        if value <= step:
            return float(step)
    return float(value)


def hours_by_day(days: Sequence[dict[str, object]], label: str) -> SafeString:
    """Per day: available hours as a wide light bar, leased and used drawn inside it."""
    width, height, left, bottom, top = 760, 240, 44, 28, 12
    n = max(1, len(days))
    peak = _nice_max(max((float(str(d["hours_available"])) for d in days), default=0.0))
    peak = max(peak, _nice_max(max((float(str(d["hours_leased"])) for d in days), default=0.0)))
    slot = (width - left - 8) / n
    plot_h = height - bottom - top
    body = [
        (
            f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 4}" y2="{top + plot_h}" '
            'stroke="#333"/>'
        ),
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end" font-size="10">{peak:g} h</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end" font-size="10">0</text>',
    ]
    for i, d in enumerate(days):
        x = left + i * slot
        day = d["date"]
        for key, inset in (("available", 0.1), ("leased", 0.25), ("used", 0.38)):
            value = float(str(d[f"hours_{key}"]))
            h = plot_h * value / peak
            body.append(
                f'<rect class="bar {key}" data-value="{value:g}" x="{x + slot * inset:.2f}" '
                f'y="{top + plot_h - h:.2f}" width="{max(slot * (1 - 2 * inset), 0.5):.2f}" '
                f'height="{h:.2f}" fill="{SERIES[key]}"><title>{escape(str(day))}: '
                f"{value:g} h {key}</title></rect>"
            )
        if isinstance(day, dt.date) and (n <= 16 or day.day in (1, 8, 15, 22)):
            body.append(
                f'<text x="{x + slot / 2:.2f}" y="{height - 12}" text-anchor="middle" '
                f'font-size="10">{day:%d %b}</text>'
            )
    for j, key in enumerate(("available", "leased", "used")):
        body.append(
            f'<rect x="{left + j * 110}" y="{height - 9}" width="10" height="8" '
            f'fill="{SERIES[key]}"/><text x="{left + j * 110 + 14}" y="{height - 1}" '
            f'font-size="10">hours {key}</text>'
        )
    return _svg("hours-by-day", width, height, body, label)


def heat_map(grid: Sequence[Sequence[float]], name: str, label: str, unit: str) -> SafeString:
    """7 x 24 cells (weekday x local hour), darker for more; the value is printed in cells."""
    cell, left, top = 28, 36, 16
    width, height = left + 24 * cell + 4, top + 7 * cell + 4
    peak = max((v for row in grid for v in row), default=0) or 1
    body = []
    for h in range(24):
        body.append(
            f'<text x="{left + h * cell + cell / 2}" y="{top - 4}" text-anchor="middle" '
            f'font-size="9">{h:02d}</text>'
        )
    for d, row in enumerate(grid):
        body.append(
            f'<text x="{left - 4}" y="{top + d * cell + cell / 2 + 3}" text-anchor="end" '
            f'font-size="10">{WEEKDAYS[d]}</text>'
        )
        for h, value in enumerate(row):
            shade = 0.08 + 0.92 * (value / peak) if value else 0.0
            fill = f"rgba(31,63,107,{shade:.3f})" if value else "#f4f4f4"
            body.append(
                f'<rect class="cell" data-value="{value:g}" x="{left + h * cell}" '
                f'y="{top + d * cell}" width="{cell - 2}" height="{cell - 2}" fill="{fill}" '
                f'stroke="#ddd"><title>{WEEKDAYS[d]} {h:02d}:00: {value:g} {unit}</title></rect>'
            )
            if value:
                color = "#fff" if shade > 0.5 else "#000"
                body.append(
                    f'<text x="{left + h * cell + cell / 2 - 1}" '
                    f'y="{top + d * cell + cell / 2 + 3}" '
                    f'text-anchor="middle" font-size="8" fill="{color}">{value:.3g}</text>'
                )
    return _svg(name, width, height, body, label)


def bars(values: dict[str, float], name: str, label: str, unit: str) -> SafeString:
    """Horizontal bars, one per key (end reasons)."""
    row, left, width = 20, 130, 560
    items = list(values.items()) or [("(none)", 0.0)]
    height = row * len(items) + 8
    peak = max((v for _, v in items), default=0) or 1
    body = []
    for i, (key, value) in enumerate(items):
        w = (width - left - 60) * value / peak
        y = 4 + i * row
        body.append(
            f'<text x="{left - 6}" y="{y + 13}" text-anchor="end" font-size="11">'
            f"{escape(key)}</text>"
            f'<rect class="bar" data-value="{value:g}" x="{left}" y="{y + 2}" width="{w:.2f}" '
            f'height="{row - 6}" fill="#1f3f6b"><title>{escape(key)}: {value:g} {unit}</title>'
            f'</rect><text x="{left + w + 4:.2f}" y="{y + 13}" font-size="11">{value:g}</text>'
        )
    return _svg(name, width, height, body, label)


def load_lines(
    points: Sequence[tuple[dt.datetime, float | None, float | None, float | None]],
    start: dt.datetime,
    end: dt.datetime,
    label: str,
) -> SafeString:
    """CPU, memory and GPU percent over ``[start, end)`` as polylines (gaps stay gaps)."""
    width, height, left, top, bottom = 760, 200, 40, 10, 24
    plot_w, plot_h = width - left - 8, height - top - bottom
    span = max((end - start).total_seconds(), 1.0)
    colors = {"cpu": "#1f3f6b", "memory": "#8a5a00", "gpu": "#2e7d32"}
    dashes = {"cpu": "", "memory": ' stroke-dasharray="6 3"', "gpu": ' stroke-dasharray="2 2"'}
    body = [
        (
            f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
            'stroke="#999"/>'
        ),
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" font-size="10">100%</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" font-size="10">0</text>',
        f'<text x="{left}" y="{height - 8}" font-size="10">{start:%Y-%m-%d %H:%M} UTC</text>',
        (
            f'<text x="{width - 8}" y="{height - 8}" text-anchor="end" font-size="10">'
            f"{end:%Y-%m-%d %H:%M} UTC</text>"
        ),
    ]
    for idx, key in enumerate(("cpu", "memory", "gpu")):
        segments: list[list[str]] = [[]]
        for point in points:
            at, values = point[0], point[1:]
            value = values[idx]
            if value is None:
                segments.append([])
                continue
            x = left + plot_w * (at - start).total_seconds() / span
            y = top + plot_h * (1 - min(max(value, 0.0), 100.0) / 100)
            segments[-1].append(f"{x:.1f},{y:.1f}")
        for seg in segments:
            if seg:
                body.append(
                    f'<polyline class="line {key}" data-points="{len(seg)}" fill="none" '
                    f'stroke="{colors[key]}" stroke-width="1.5"{dashes[key]} '
                    f'points="{" ".join(seg)}"><title>{key} %</title></polyline>'
                )
        body.append(
            f'<text x="{left + 8 + idx * 90}" y="{top + 14}" font-size="10" '
            f'fill="{colors[key]}">{key} %</text>'
        )
    return _svg("load-history", width, height, body, label)
