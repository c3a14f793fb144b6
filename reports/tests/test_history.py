"""The load history: written from the metrics flush, downsampled as it ages, totals kept."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from django.db.models import Sum

from machines.heartbeats import MetricsWriter, metrics_flushed
from machines.models import Machine
from reports.history import bucket, downsample, load_history, record_loads
from reports.models import MachineLoad
from tests.factories import MachineFactory

UTC = dt.UTC


def _totals() -> dict[str, Any]:
    return MachineLoad.objects.aggregate(
        samples=Sum("samples"), cpu=Sum("cpu_sum"), memory=Sum("memory_sum"),
        gpu_samples=Sum("gpu_samples"), gpu=Sum("gpu_sum"),
    )  # fmt: skip


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
    assert not MachineLoad.objects.filter(resolution=60, at__lt=cutoff).exists()
    assert MachineLoad.objects.filter(resolution=900).exists()
    assert MachineLoad.objects.filter(resolution=60, at__gte=cutoff).count() == 2 * 7 * 24 * 20
    # The hour's average is the same from the 15-minute points as from the 1-minute ones.
    start = now - dt.timedelta(days=9)
    quarters = MachineLoad.objects.filter(
        machine=machines[0], resolution=900, at__gte=start, at__lt=start + dt.timedelta(hours=1)
    )
    assert quarters.count() == 4
    assert sum(q.samples for q in quarters) == sum(s for s, _ in hour_before)
    assert sum(q.cpu_sum for q in quarters) == pytest.approx(sum(c for _, c in hour_before))
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
    for q in range(8):  # two hours of quarters, 100 days ago
        MachineLoad.objects.create(
            machine=m, at=old + dt.timedelta(minutes=15 * q), resolution=900,
            samples=15, cpu_sum=15.0 * q, memory_sum=150.0,
        )  # fmt: skip
    MachineLoad.objects.create(
        machine=m, at=now - dt.timedelta(days=400), resolution=3600, samples=60, cpu_sum=60.0
    )
    result = downsample(now)
    assert result["dropped"] == 1
    hours = list(MachineLoad.objects.filter(resolution=3600).order_by("at"))
    assert [(h.at, h.samples, h.cpu_sum) for h in hours] == [
        (old, 60, 15.0 * (0 + 1 + 2 + 3)),
        (old + dt.timedelta(hours=1), 60, 15.0 * (4 + 5 + 6 + 7)),
    ]
    assert load_history(m.pk, old, now)[0][:3] == (old, 3600, 1.5)
