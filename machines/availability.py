"""Lab availability windows: when may a lab's machines be lent? Pure queries, no writes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from machines.models import AvailabilityWindow, ClosedDate, Lab

_HORIZON_DAYS = 8


def _intervals(lab: Lab, day: dt.date) -> list[tuple[dt.datetime, dt.datetime]]:
    """Open intervals of ``lab`` on local ``day`` as aware datetimes (empty on closed days)."""
    tz = lab.tz
    windows: list[AvailabilityWindow] = [w for w in lab.windows.all() if w.weekday == day.weekday()]
    closed = {c.date for c in lab.closed_dates.all()}
    if day in closed:
        return []
    if not lab.windows.all():
        start = dt.datetime.combine(day, dt.time(0), tz)
        return [(start, dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), tz))]
    out = []
    for w in windows:
        start = dt.datetime.combine(day, w.start, tz)
        end_day = day + dt.timedelta(days=1) if w.end == dt.time(0) else day
        out.append((start, dt.datetime.combine(end_day, w.end, tz)))
    return sorted(out)


def open_intervals(lab: Lab, day: dt.date) -> list[tuple[dt.datetime, dt.datetime]]:
    """Open intervals of ``lab`` on its local ``day``, in UTC (the staff reports add them up;
    aware datetimes of one zone subtract as wall-clock times, wrong across a DST change)."""
    return [(a.astimezone(dt.UTC), b.astimezone(dt.UTC)) for a, b in _intervals(lab, day)]


def open_until(lab: Lab, at: dt.datetime) -> dt.datetime | None:
    """If ``lab`` is open at ``at``, when does this opening end (adjacent windows merged)?

    None means closed at ``at``. A lab without windows or closures is open for the horizon.
    """
    local = at.astimezone(lab.tz)
    current: dt.datetime | None = None
    for offset in range(-1, _HORIZON_DAYS):
        for start, end in _intervals(lab, local.date() + dt.timedelta(days=offset)):
            if current is None:
                if start <= at < end:
                    current = end
            elif start <= current:
                current = max(current, end)
            elif start > current:
                return current
    return current


def is_open(lab: Lab, at: dt.datetime) -> bool:
    return open_until(lab, at) is not None


def labs_prefetched() -> list[Lab]:
    return list(Lab.objects.prefetch_related("windows", "closed_dates"))


def closes_at(lab: Lab, at: dt.datetime) -> dt.datetime | None:
    """When ``lab``'s current opening ends, in UTC (None: closed at ``at``).

    ``open_until`` answers in the lab's zone; leases, API answers and messages are all UTC.
    """
    until = open_until(lab, at)
    return None if until is None else until.astimezone(dt.UTC)


def lab_closes_at(lab_id: int, at: dt.datetime) -> dt.datetime | None:
    """``closes_at`` for one lab, loaded with its windows and closures."""
    lab = Lab.objects.prefetch_related("windows", "closed_dates").get(pk=lab_id)
    return closes_at(lab, at)


def closing_times(
    at: dt.datetime, lab_ids: Iterable[int] | None = None
) -> dict[int, dt.datetime | None]:
    """``closes_at`` of every lab (or of those in ``lab_ids``), by lab id (one query for all
    labs, one each for their windows and closures)."""
    if lab_ids is None:
        labs = labs_prefetched()
    else:
        labs = list(Lab.objects.filter(pk__in=lab_ids).prefetch_related("windows", "closed_dates"))
    return {lab.pk: closes_at(lab, at) for lab in labs}


__all__ = [
    "ClosedDate",
    "closes_at",
    "closing_times",
    "is_open",
    "lab_closes_at",
    "labs_prefetched",
    "open_intervals",
    "open_until",
]
