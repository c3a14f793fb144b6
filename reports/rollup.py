"""The nightly rollup of the staff reports: each lab's finished local days, stored as
``LabDayRollup`` rows, so a month's report adds up ~30 rows per lab and computes only the days
not rolled up yet (today, a day a session still runs over) live, with the same figures.

Safe to run twice and concurrently (an upsert per day). Late data is caught two ways: the
last ``NEXCOMPUTE_REPORT_ROLLUP_RECENT_DAYS`` days are recomputed on every run, and a day a
session was still running over is not stored until that session has ended (then the backfill,
which fills every missing day back to the lab's oldest machine, picks it up). A stored day
whose lab changed since (time zone, open hours, its machines) is ignored by the reports and
counts as missing here, so the next run computes it again.
"""

from __future__ import annotations

import datetime as dt
import logging

from django.conf import settings
from django.db import transaction
from django.db.models import Min

from machines.models import Lab, Machine
from reports.figures import day_parts, days_of, stored_days
from reports.models import LabDayRollup

log = logging.getLogger(__name__)

CHUNK_DAYS = 31
"""Days computed in one pass (a pass reads its period's sessions and status rows once)."""


def rollup_days(lab: Lab, days: list[dt.date], *, now: dt.datetime) -> int:
    """Compute and store ``days`` of ``lab`` that are over by ``now``; returns days stored."""
    today = now.astimezone(lab.tz).date()
    wanted = sorted(d for d in set(days) if d < today)
    stored = 0
    i = 0
    while i < len(wanted):
        # Consecutive days, at most CHUNK_DAYS, in one pass.
        j = i
        while (
            j + 1 < len(wanted)
            and wanted[j + 1] == wanted[j] + dt.timedelta(days=1)
            and j + 1 - i < CHUNK_DAYS
        ):
            j += 1
        parts = day_parts(lab, wanted[i], wanted[j], now=now)
        rows = [
            LabDayRollup(
                lab=lab, day=day, timezone=lab.timezone, computed_at=now, parts=part.as_json()
            )
            for day, part in parts.items()
            if not part.live
        ]
        with transaction.atomic():
            LabDayRollup.objects.bulk_create(
                rows,
                update_conflicts=True,
                unique_fields=["lab", "day"],
                update_fields=["timezone", "computed_at", "parts"],
            )
        stored += len(rows)
        i = j + 1
    return stored


def rollup_lab(
    lab: Lab,
    *,
    now: dt.datetime,
    first: dt.date | None = None,
    last: dt.date | None = None,
) -> int:
    """Recompute ``first``..``last`` of ``lab`` if given; else the recent days, then the
    missing days back to the lab's oldest machine (at most the backfill limit, newest
    first)."""
    if first is not None or last is not None:
        today = now.astimezone(lab.tz).date()
        first = first or last or today
        last = last or today
        return rollup_days(lab, days_of(first, last), now=now)
    today = now.astimezone(lab.tz).date()
    recent = today - dt.timedelta(days=settings.NEXCOMPUTE_REPORT_ROLLUP_RECENT_DAYS)
    stored = rollup_days(lab, days_of(recent, today - dt.timedelta(days=1)), now=now)
    oldest = Machine.objects.filter(lab=lab).aggregate(m=Min("created_at"))["m"]
    if oldest is None:
        return stored
    begin = oldest.astimezone(lab.tz).date()
    if begin >= recent:
        return stored
    # Days stored and still holding (a day of a lab changed since is computed again).
    have = set(
        stored_days([lab], begin, recent - dt.timedelta(days=1), now=now, sums=False).days.get(
            lab.pk, {}
        )
    )
    missing = [d for d in days_of(begin, recent - dt.timedelta(days=1)) if d not in have]
    missing = missing[-settings.NEXCOMPUTE_REPORT_ROLLUP_BACKFILL_DAYS :]
    if missing:
        stored += rollup_days(lab, missing, now=now)
    return stored


def rollup(
    *,
    now: dt.datetime,
    lab_ids: list[int] | None = None,
    first: dt.date | None = None,
    last: dt.date | None = None,
) -> int:
    labs = Lab.objects.prefetch_related("windows", "closed_dates").order_by("pk")
    if lab_ids is not None:
        labs = labs.filter(pk__in=lab_ids)
    stored = 0
    for lab in labs:
        stored += rollup_lab(lab, now=now, first=first, last=last)
    log.info("report rollup: %d lab days stored", stored)
    return stored
