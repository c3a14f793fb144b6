"""The machines' load history: written in bulk from the agent link's metrics flush, then
downsampled as it ages (1-minute points, then 15-minute, then hourly) and finally dropped.

Every point holds sums and sample counts, never averages, so adding points together (what
downsampling does) keeps every total exact. Recent 1-minute points are rows of
``MachineLoad`` (the flush adds into them); aged points are packed, a machine's UTC day at one
resolution per ``MachineLoadDay`` row (34 bytes a point instead of ~164 as a row of its own).
"""

from __future__ import annotations

import datetime as dt
import struct
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from machines.models import Machine
from reports.figures import EPOCH, MICROSECOND, Epoch
from reports.models import MachineLoad, MachineLoadDay

Row = tuple[int, int, dt.datetime, int, float, float, int, float]
"""machine_id, resolution, at, samples, cpu_sum, memory_sum, gpu_samples, gpu_sum"""

_TABLE = MachineLoad._meta.db_table
_COLUMNS = "machine_id, resolution, at, samples, cpu_sum, memory_sum, gpu_samples, gpu_sum"
_ADD = ", ".join(
    f"{c} = {_TABLE}.{c} + excluded.{c}"
    for c in ("samples", "cpu_sum", "memory_sum", "gpu_samples", "gpu_sum")
)


POINT = struct.Struct(">HIddId")
"""A packed point: slot in its day (the bucket's start is midnight + slot x resolution),
samples, CPU sum, memory sum, GPU samples, GPU sum; network byte order, as PostgreSQL's
``int2send``/``int4send``/``float8send`` write them (the benchmark packs days in SQL)."""
DAY_SECONDS = 86400
Sums = list[Any]
"""[samples, cpu_sum, memory_sum, gpu_samples, gpu_sum]"""


def bucket(at: dt.datetime, seconds: int) -> dt.datetime:
    """The start of the ``seconds``-long UTC bucket holding ``at``."""
    epoch = int(at.timestamp())
    return dt.datetime.fromtimestamp(epoch - epoch % seconds, dt.UTC)


def add_points(rows: Sequence[Row]) -> None:
    """Add ``rows`` into their buckets (insert, or add to the sums already there) in one
    prepared statement; points of machines deleted meanwhile are dropped."""
    if not rows:
        return
    machines = "machines_machine"
    sql = (
        f"INSERT INTO {_TABLE} ({_COLUMNS}) "
        f"SELECT %s, %s, %s, %s, %s, %s, %s, %s "
        f"WHERE EXISTS (SELECT 1 FROM {machines} WHERE id = %s) "
        f"ON CONFLICT (machine_id, at, resolution) DO UPDATE SET {_ADD}"
    )
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.executemany(sql, [(*row, row[0]) for row in rows])


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def record_loads(batch: dict[int, tuple[dict[str, Any], dt.datetime]]) -> int:
    """One 1-minute sample per machine of ``batch`` (``{machine_id: (metrics, seen)}``)."""
    rows: list[Row] = []
    for machine_id, (metrics, seen) in batch.items():
        cpu, memory = _number(metrics.get("cpu_percent")), _number(metrics.get("memory_percent"))
        if cpu is None or memory is None:
            continue
        gpu = _number(metrics.get("gpu_percent"))
        at = bucket(seen, MachineLoad.Resolution.MINUTE)
        rows.append((machine_id, 60, at, 1, cpu, memory, 0 if gpu is None else 1, gpu or 0.0))
    add_points(rows)
    return len(rows)


def record_flush(sender: object, *, batch: dict[int, Any], **kwargs: object) -> None:
    """Receiver of ``machines.heartbeats.metrics_flushed`` (in the writer's worker thread)."""
    record_loads(batch)


# --- ageing ------------------------------------------------------------------------------------


def pack(points: dict[int, Sums]) -> bytes:
    return b"".join(POINT.pack(slot, *points[slot]) for slot in sorted(points))


def unpack(data: bytes | memoryview) -> dict[int, Sums]:
    return {slot: list(rest) for slot, *rest in POINT.iter_unpack(bytes(data))}


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(0), dt.UTC)


def _add(acc: Sums, values: Sequence[Any]) -> None:
    for i, value in enumerate(values):
        acc[i] += value


def _add_packs(packs: dict[tuple[int, dt.date, int], dict[int, Sums]]) -> None:
    """Add ``packs`` ({(machine, day, resolution): {slot: sums}}) into the stored day rows
    (inside the caller's transaction; the rows are locked while they are merged). Packs of
    machines deleted meanwhile are dropped."""
    if not packs:
        return
    machine_ids = {m for m, _d, _r in packs}
    days = {d for _m, d, _r in packs}
    live = set(Machine.objects.filter(pk__in=machine_ids).values_list("pk", flat=True))
    stored = MachineLoadDay.objects.select_for_update().filter(
        machine_id__in=machine_ids, day__gte=min(days), day__lte=max(days)
    )
    merged: dict[tuple[int, dt.date, int], dict[int, Sums]] = {}
    for row in stored:
        key = (row.machine_id, row.day, row.resolution)
        if key in packs:
            merged[key] = unpack(row.points)
    rows = []
    for key, points in packs.items():
        if key[0] not in live:
            continue
        into = merged.setdefault(key, {})
        for slot, sums in points.items():
            if slot in into:
                _add(into[slot], sums)
            else:
                into[slot] = list(sums)
        rows.append(
            MachineLoadDay(machine_id=key[0], day=key[1], resolution=key[2], points=pack(into))
        )
    MachineLoadDay.objects.bulk_create(
        rows,
        update_conflicts=True,
        unique_fields=["machine", "day", "resolution"],
        update_fields=["points"],
    )


def _fold_minutes(now: dt.datetime) -> int:
    """1-minute rows older than their age limit into the 15-minute day rows, a day at a time.
    The flush only ever writes the current minute, so the slices folded here are never
    written to concurrently."""
    quarter = MachineLoad.Resolution.QUARTER
    days = settings.NEXCOMPUTE_METRICS_MINUTE_DAYS
    # Cut on a 15-minute boundary, so no 15-minute point is built from half its minutes.
    cutoff = bucket(now - dt.timedelta(days=days), quarter)
    old = MachineLoad.objects.filter(at__lt=cutoff)
    oldest = old.order_by("at").values_list("at", flat=True).first()
    folded = 0
    if oldest is None:
        return 0
    begin = bucket(oldest, DAY_SECONDS)
    while begin < cutoff:
        end = min(begin + dt.timedelta(days=1), cutoff)
        with transaction.atomic():
            piece = old.filter(at__gte=begin, at__lt=end)
            points = list(
                piece.values_list(
                    "machine_id", "at", "resolution", "samples", "cpu_sum", "memory_sum",
                    "gpu_samples", "gpu_sum",
                )
            )  # fmt: skip
            packs: dict[tuple[int, dt.date, int], dict[int, Sums]] = defaultdict(dict)
            for machine_id, at, resolution, *sums in points:
                coarse = max(quarter, resolution)  # (rows of older versions may be coarser)
                start = bucket(at, coarse)
                slot = int((start - _midnight(start.date())).total_seconds()) // coarse
                into = packs[(machine_id, start.date(), coarse)]
                if slot in into:
                    _add(into[slot], sums)
                else:
                    into[slot] = list(sums)
            _add_packs(packs)
            piece.delete()
        folded += len(points)
        begin = end
    return folded


def _fold_quarters(now: dt.datetime) -> int:
    """15-minute day rows of days older than their age limit into hourly day rows."""
    quarter, hour = MachineLoad.Resolution.QUARTER, MachineLoad.Resolution.HOUR
    days = settings.NEXCOMPUTE_METRICS_QUARTER_DAYS
    # Whole days only: the day of the cutoff stays at 15 minutes until it is all past.
    before = (now - dt.timedelta(days=days)).astimezone(dt.UTC).date()
    folded = 0
    while True:
        with transaction.atomic():
            rows = list(
                MachineLoadDay.objects.select_for_update()
                .filter(resolution=quarter, day__lt=before)
                .order_by("day", "machine_id")[:2000]
            )
            if not rows:
                return folded
            packs: dict[tuple[int, dt.date, int], dict[int, Sums]] = defaultdict(dict)
            for row in rows:
                into = packs[(row.machine_id, row.day, hour)]
                for slot, sums in unpack(row.points).items():
                    folded += 1
                    target = slot * quarter // hour
                    if target in into:
                        _add(into[target], sums)
                    else:
                        into[target] = sums
            _add_packs(packs)
            MachineLoadDay.objects.filter(
                pk__in=[(r.machine_id, r.day, r.resolution) for r in rows]
            ).delete()


def downsample(now: dt.datetime) -> dict[str, int]:
    """Fold points older than their resolution's age limit into the next coarser resolution,
    then drop points past ``NEXCOMPUTE_METRICS_RETENTION_DAYS`` (a packed day once all of it
    is past). Idempotent; the beat runs it hourly. Returns points folded and rows dropped."""
    folded = _fold_minutes(now) + _fold_quarters(now)
    retention = now - dt.timedelta(days=settings.NEXCOMPUTE_METRICS_RETENTION_DAYS)
    dropped, _ = MachineLoad.objects.filter(at__lt=retention).delete()
    days, _ = MachineLoadDay.objects.filter(day__lt=retention.astimezone(dt.UTC).date()).delete()
    return {"folded": folded, "dropped": dropped + days}


HistoryPoint = tuple[int, dt.datetime, int, int, float, float, int, float]
"""machine_id, at, resolution, samples, cpu_sum, memory_sum, gpu_samples, gpu_sum"""


def history_points(
    machine_id: int | None = None,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
) -> list[HistoryPoint]:
    """Every point (of one machine, in ``[start, end)``), recent rows and packed days alike,
    ordered by machine, time and resolution."""
    rows = MachineLoad.objects.all()
    packed = MachineLoadDay.objects.all()
    if machine_id is not None:
        rows, packed = rows.filter(machine_id=machine_id), packed.filter(machine_id=machine_id)
    if start is not None:
        rows = rows.filter(at__gte=start)
        packed = packed.filter(day__gte=start.astimezone(dt.UTC).date())
    if end is not None:
        rows = rows.filter(at__lt=end)
        packed = packed.filter(day__lte=end.astimezone(dt.UTC).date())
    # The instants as epoch microseconds: psycopg's parsing of 10,000 timestamps (a week of
    # 1-minute points) cost most of the machine page.
    out: list[HistoryPoint] = [
        (m, EPOCH + us * MICROSECOND, res, samples, cpu, memory, gpu_samples, gpu)
        for m, us, res, samples, cpu, memory, gpu_samples, gpu in rows.annotate(
            us=Epoch("at")
        ).values_list(
            "machine_id", "us", "resolution", "samples", "cpu_sum", "memory_sum",
            "gpu_samples", "gpu_sum",
        )
    ]  # fmt: skip
    for m, day, resolution, data in packed.values_list("machine_id", "day", "resolution", "points"):
        midnight = _midnight(day)
        for slot, *sums in POINT.iter_unpack(bytes(data)):
            at = midnight + dt.timedelta(seconds=slot * resolution)
            if (start is None or at >= start) and (end is None or at < end):
                out.append((m, at, resolution, *sums))
    out.sort(key=lambda p: (p[0], p[1], p[2]))
    return out


def load_history(
    machine_id: int, start: dt.datetime, end: dt.datetime
) -> list[tuple[dt.datetime, int, float | None, float | None, float | None]]:
    """(at, resolution, cpu %, memory %, gpu %) of one machine's points in ``[start, end)``,
    every resolution together, oldest first."""
    return [
        (
            at,
            resolution,
            cpu / samples if samples else None,
            memory / samples if samples else None,
            gpu / gpu_samples if gpu_samples else None,
        )
        for _m, at, resolution, samples, cpu, memory, gpu_samples, gpu in history_points(
            machine_id, start, end
        )
    ]
