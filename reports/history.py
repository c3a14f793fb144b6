"""The machines' load history: written in bulk from the agent link's metrics flush, then
downsampled as it ages (1-minute points, then 15-minute, then hourly) and finally dropped.

Every point holds sums and sample counts, never averages, so adding points together (what
downsampling does) keeps every total exact.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from reports.models import MachineLoad

Row = tuple[int, int, dt.datetime, int, float, float, int, float]
"""machine_id, resolution, at, samples, cpu_sum, memory_sum, gpu_samples, gpu_sum"""

_TABLE = MachineLoad._meta.db_table
_COLUMNS = "machine_id, resolution, at, samples, cpu_sum, memory_sum, gpu_samples, gpu_sum"
_ADD = ", ".join(
    f"{c} = {_TABLE}.{c} + excluded.{c}"
    for c in ("samples", "cpu_sum", "memory_sum", "gpu_samples", "gpu_sum")
)


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

# (finer resolution, coarser resolution, setting: days the finer points are kept)
_STEPS = (
    (
        MachineLoad.Resolution.MINUTE,
        MachineLoad.Resolution.QUARTER,
        "NEXCOMPUTE_METRICS_MINUTE_DAYS",
    ),
    (
        MachineLoad.Resolution.QUARTER,
        MachineLoad.Resolution.HOUR,
        "NEXCOMPUTE_METRICS_QUARTER_DAYS",
    ),
)


def _merge(points: Iterable[tuple[Any, ...]], coarse: int) -> list[Row]:
    sums: dict[tuple[int, dt.datetime], list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0, 0.0])
    for machine_id, at, samples, cpu, memory, gpu_samples, gpu in points:
        acc = sums[(machine_id, bucket(at, coarse))]
        acc[0] += samples
        acc[1] += cpu
        acc[2] += memory
        acc[3] += gpu_samples
        acc[4] += gpu
    return [(m, coarse, at, int(a[0]), a[1], a[2], int(a[3]), a[4]) for (m, at), a in sums.items()]


def downsample(now: dt.datetime) -> dict[str, int]:
    """Fold points older than their resolution's age limit into the next coarser resolution,
    a day at a time, then drop points past ``NEXCOMPUTE_METRICS_RETENTION_DAYS``. Idempotent;
    the beat runs it hourly (then there is an hour to fold). Returns rows folded and dropped.

    The flush only ever writes the current minute, so the old slices folded here are never
    written to concurrently."""
    folded = 0
    for fine, coarse, setting in _STEPS:
        # Cut on a coarse bucket boundary, so no coarse bucket is built from half its points.
        cutoff = bucket(now - dt.timedelta(days=getattr(settings, setting)), coarse)
        old = MachineLoad.objects.filter(resolution=fine, at__lt=cutoff)
        oldest = old.order_by("at").values_list("at", flat=True).first()
        if oldest is None:
            continue
        begin = bucket(oldest, coarse)
        while begin < cutoff:
            end = min(begin + dt.timedelta(days=1), cutoff)
            with transaction.atomic():
                piece = old.filter(at__gte=begin, at__lt=end)
                points = list(
                    piece.values_list(
                        "machine_id", "at", "samples", "cpu_sum", "memory_sum",
                        "gpu_samples", "gpu_sum",
                    )
                )  # fmt: skip
                add_points(_merge(points, coarse))
                piece.delete()
            folded += len(points)
            begin = end
    retention = now - dt.timedelta(days=settings.NEXCOMPUTE_METRICS_RETENTION_DAYS)
    dropped, _ = MachineLoad.objects.filter(at__lt=retention).delete()
    return {"folded": folded, "dropped": dropped}


def load_history(
    machine_id: int, start: dt.datetime, end: dt.datetime
) -> list[tuple[dt.datetime, int, float | None, float | None, float | None]]:
    """(at, resolution, cpu %, memory %, gpu %) of one machine's points in ``[start, end)``,
    every resolution together, oldest first."""
    return [
        (p.at, p.resolution, p.cpu, p.memory, p.gpu)
        for p in MachineLoad.objects.filter(machine_id=machine_id, at__gte=start, at__lt=end)
        .order_by("at", "resolution")
        .only("at", "resolution", "samples", "cpu_sum", "memory_sum", "gpu_samples", "gpu_sum")
    ]
