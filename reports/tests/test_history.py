"""The load history: written from the metrics flush, downsampled as it ages, totals kept."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest

from machines.heartbeats import MetricsWriter, metrics_flushed
from machines.models import Machine
from reports.history import (
    POINT,
    bucket,
    downsample,
    history_points,
    load_history,
    pack,
    record_loads,
    unpack,
)
from reports.models import MachineLoad, MachineLoadDay
from tests.factories import MachineFactory

UTC = dt.UTC


def _totals() -> dict[str, Any]:
    """The sums over every point, recent rows and packed days alike."""
    points = history_points()
    return {
        key: sum(p[i] for p in points)
        for key, i in (("samples", 3), ("cpu", 4), ("memory", 5), ("gpu_samples", 6), ("gpu", 7))
    }


@pytest.mark.django_db
def test_flushes_add_samples_into_minute_buckets() -> None:
    m = MachineFactory.create()
    t0 = dt.datetime(2026, 3, 1, 12, 0, 5, tzinfo=UTC)
    record_loads({m.pk: ({"cpu_percent": 10.0, "memory_percent": 50.0}, t0)})
    record_loads(
        {
            m.pk: (
                {"cpu_percent": 30.0, "memory_percent": 70.0, "gpu_percent": 80.0},
                t0 + dt.timedelta(seconds=40),
            )
        }
    )
    record_loads(
        {m.pk: ({"cpu_percent": 90.0, "memory_percent": 10.0}, t0 + dt.timedelta(seconds=60))}
    )
    points = list(MachineLoad.objects.order_by("at"))
    assert [(p.at, p.samples, p.cpu, p.memory, p.gpu) for p in points] == [
        (dt.datetime(2026, 3, 1, 12, 0, tzinfo=UTC), 2, 20.0, 60.0, 80.0),
        (dt.datetime(2026, 3, 1, 12, 1, tzinfo=UTC), 1, 90.0, 10.0, None),
    ]


@pytest.mark.django_db
def test_a_deleted_machine_does_not_break_the_batch() -> None:
    m, gone = MachineFactory.create(), MachineFactory.create()
    gone_id = gone.pk
    gone.delete()
    now = dt.datetime(2026, 3, 1, tzinfo=UTC)
    record_loads({
        gone_id: ({"cpu_percent": 1.0, "memory_percent": 1.0}, now),
        m.pk: ({"cpu_percent": 2.0, "memory_percent": 2.0}, now),
    })  # fmt: skip
    assert list(MachineLoad.objects.values_list("machine_id", flat=True)) == [m.pk]


@pytest.mark.django_db(transaction=True)
def test_the_agent_links_metrics_writer_records_history(settings: Any) -> None:
    """The real batched writer of the agent link, on an event loop: its flush writes the
    latest metrics and, through ``metrics_flushed``, the history point."""
    settings.NEXCOMPUTE_METRICS_WRITE_SECONDS = 0.05
    m = MachineFactory.create()
    seen = dt.datetime.now(UTC)
    received: list[Any] = []

    def spy(sender: object, **kwargs: Any) -> None:
        received.append(kwargs["batch"])

    metrics_flushed.connect(spy)
    try:

        async def run() -> None:
            writer = MetricsWriter()
            writer.update(m.pk, metrics={"cpu_percent": 42.0, "memory_percent": 21.0}, seen=seen)
            for _ in range(200):
                await asyncio.sleep(0.05)
                if received:
                    break
            assert writer.tasks, "the writer started no flush task"
            for task in writer.tasks:
                task.cancel()
            await asyncio.gather(*writer.tasks, return_exceptions=True)

        asyncio.run(run())
    finally:
        metrics_flushed.disconnect(spy)
    assert received, "the writer never flushed"
    point = MachineLoad.objects.get(machine=m)
    assert (point.at, point.resolution, point.cpu, point.memory) == (
        bucket(seen, 60),
        60,
        42.0,
        21.0,
    )
    assert Machine.objects.get(pk=m.pk).metrics == {"cpu_percent": 42.0, "memory_percent": 21.0}


@pytest.mark.django_db
def test_downsampling_keeps_the_totals(settings: Any) -> None:
    settings.NEXCOMPUTE_METRICS_MINUTE_DAYS = 7
    settings.NEXCOMPUTE_METRICS_QUARTER_DAYS = 92
    settings.NEXCOMPUTE_METRICS_RETENTION_DAYS = 730
    now = dt.datetime(2026, 6, 1, 0, 0, tzinfo=UTC)
    machines = [MachineFactory.create(), MachineFactory.create()]
    rows = []
    # 1-minute points over 10 days ending now, every 7th minute with a GPU figure.
    for m_index, m in enumerate(machines):
        for minute in range(0, 10 * 24 * 60, 3):
            at = now - dt.timedelta(minutes=minute + 1)
            cpu = float((minute * 7 + m_index) % 101)
            gpu = float(minute % 13) if minute % 7 == 0 else None
            rows.append(
                MachineLoad(
                    machine=m, at=bucket(at, 60), resolution=60, samples=2, cpu_sum=2 * cpu,
                    memory_sum=2 * (100 - cpu), gpu_samples=0 if gpu is None else 1,
                    gpu_sum=gpu or 0.0,
                )
            )  # fmt: skip
    MachineLoad.objects.bulk_create(rows)
    before = _totals()
    hour_before = list(
        MachineLoad.objects.filter(
            machine=machines[0],
            at__gte=now - dt.timedelta(days=9),
            at__lt=now - dt.timedelta(days=9) + dt.timedelta(hours=1),
        ).values_list("samples", "cpu_sum")
    )

    result = downsample(now)
    assert result["folded"] > 0
    after = _totals()
    assert after["samples"] == before["samples"] and after["gpu_samples"] == before["gpu_samples"]
    for key in ("cpu", "memory", "gpu"):
        assert after[key] == pytest.approx(before[key], rel=1e-12)
    # Nothing older than a week is still a 1-minute point; nothing newer was touched.
    cutoff = now - dt.timedelta(days=7)
    assert not MachineLoad.objects.filter(at__lt=cutoff).exists()
    assert MachineLoad.objects.filter(resolution=60, at__gte=cutoff).count() == 2 * 7 * 24 * 20
    # Packed: one row per machine and day (the 3 days before the cutoff, for 2 machines).
    assert MachineLoadDay.objects.filter(resolution=900).count() == 2 * 3
    assert {p[2] for p in history_points(end=cutoff)} == {900}
    # The hour's average is the same from the 15-minute points as from the 1-minute ones.
    start = now - dt.timedelta(days=9)
    quarters = history_points(machines[0].pk, start, start + dt.timedelta(hours=1))
    assert [q[1] for q in quarters] == [start + dt.timedelta(minutes=15 * n) for n in range(4)]
    assert sum(q[3] for q in quarters) == sum(s for s, _ in hour_before)
    assert sum(q[4] for q in quarters) == pytest.approx(sum(c for _, c in hour_before))
    # Run again: nothing left to fold, the totals unchanged.
    assert downsample(now)["folded"] == 0
    assert _totals()["samples"] == before["samples"]


@pytest.mark.django_db
def test_quarters_become_hours_and_old_points_are_dropped(settings: Any) -> None:
    settings.NEXCOMPUTE_METRICS_QUARTER_DAYS = 92
    settings.NEXCOMPUTE_METRICS_RETENTION_DAYS = 365
    now = dt.datetime(2026, 6, 1, tzinfo=UTC)
    m = MachineFactory.create()
    old = now - dt.timedelta(days=100)
    # Two hours of quarters, 100 days ago (from 00:00), packed as the ageing leaves them.
    MachineLoadDay.objects.create(
        machine=m, day=old.date(), resolution=900,
        points=pack({q: [15, 15.0 * q, 150.0, 0, 0.0] for q in range(8)}),
    )  # fmt: skip
    # Still within 92 days: stays at 15 minutes.
    recent = (now - dt.timedelta(days=91)).date()
    MachineLoadDay.objects.create(
        machine=m, day=recent, resolution=900, points=pack({5: [15, 1.0, 1.0, 0, 0.0]})
    )
    MachineLoadDay.objects.create(
        machine=m, day=(now - dt.timedelta(days=400)).date(), resolution=3600,
        points=pack({0: [60, 60.0, 0.0, 0, 0.0]}),
    )  # fmt: skip
    result = downsample(now)
    assert result["dropped"] == 1 and result["folded"] == 8
    hours = [p for p in history_points() if p[2] == 3600]
    assert [(h[1], h[3], h[4]) for h in hours] == [
        (old, 60, 15.0 * (0 + 1 + 2 + 3)),
        (old + dt.timedelta(hours=1), 60, 15.0 * (4 + 5 + 6 + 7)),
    ]
    assert [(p[1], p[2]) for p in history_points(start=now - dt.timedelta(days=92))] == [
        (dt.datetime.combine(recent, dt.time(1, 15), UTC), 900)
    ]
    assert load_history(m.pk, old, now)[0][:3] == (old, 3600, 1.5 * 0 + 15.0 * 6 / 60)
    # Run again: nothing to fold or drop.
    assert downsample(now) == {"folded": 0, "dropped": 0}


@pytest.mark.django_db
def test_the_machine_page_s_history_reads_packed_days_in_its_range() -> None:
    m = MachineFactory.create()
    day = dt.date(2026, 3, 1)
    MachineLoadDay.objects.create(
        machine=m, day=day, resolution=900,
        points=pack({n: [90, 90.0 * n, 45.0 * 90, 90, 9.0 * 90] for n in range(96)}),
    )  # fmt: skip
    record_loads(
        {
            m.pk: (
                {"cpu_percent": 7.0, "memory_percent": 8.0},
                dt.datetime(2026, 3, 2, 0, 0, 30, tzinfo=UTC),
            )
        }
    )
    start = dt.datetime(2026, 3, 1, 23, 0, tzinfo=UTC)
    got = load_history(m.pk, start, dt.datetime(2026, 3, 2, 1, tzinfo=UTC))
    assert got == [
        (start, 900, 92.0, 45.0, 9.0),
        (start + dt.timedelta(minutes=15), 900, 93.0, 45.0, 9.0),
        (start + dt.timedelta(minutes=30), 900, 94.0, 45.0, 9.0),
        (start + dt.timedelta(minutes=45), 900, 95.0, 45.0, 9.0),
        (dt.datetime(2026, 3, 2, tzinfo=UTC), 60, 7.0, 8.0, None),
    ]


@pytest.mark.django_db
def test_packed_points_are_what_postgresql_writes() -> None:
    """The benchmark packs days in SQL: the same bytes as ``pack``, read back by ``unpack``."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(
            "SELECT int2send(95::int2) || int4send(90) || float8send(12.5::float8)"
            " || float8send(0.1::float8) || int4send(3) || float8send(7.25::float8)"
        )
        (data,) = cur.fetchone()
    assert bytes(data) == pack({95: [90, 12.5, 0.1, 3, 7.25]})
    assert len(bytes(data)) == POINT.size == 34
    assert unpack(data) == {95: [90, 12.5, 0.1, 3, 7.25]}


@pytest.mark.django_db
def test_the_migration_packs_the_aged_rows_of_an_older_version() -> None:
    import importlib

    from django.apps import apps

    migration = importlib.import_module("reports.migrations.0003_issue14_packed_load_history")
    m = MachineFactory.create()
    at = dt.datetime(2026, 1, 5, 13, 45, tzinfo=UTC)
    MachineLoad.objects.create(machine=m, at=at, resolution=900, samples=90, cpu_sum=9.0)
    MachineLoad.objects.create(
        machine=m, at=at - dt.timedelta(days=200, minutes=45), resolution=3600, samples=360,
        cpu_sum=36.0, gpu_samples=360, gpu_sum=72.0,
    )  # fmt: skip
    MachineLoad.objects.create(machine=m, at=at, resolution=60, samples=6, cpu_sum=6.0)
    before = history_points()
    migration.pack_aged_points(apps, None)
    assert MachineLoadDay.objects.count() == 2
    assert list(MachineLoad.objects.values_list("resolution", flat=True)) == [60]
    assert history_points() == before
