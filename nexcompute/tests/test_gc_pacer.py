"""Garbage collection by the clock in web processes (nexcompute/gc_pacer.py)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from nexcompute.gc_pacer import GcPacer
from nexcompute.metrics import EVENT_LOOP_LAG, GC_PAUSE


class Node:
    """A cycle's member: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def sample(name: str, **labels: str) -> float:
    for metric in (GC_PAUSE, EVENT_LOOP_LAG):
        for family in metric.collect():
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
    return 0.0


@pytest.fixture
def quiet_collector() -> Iterator[None]:
    """CPython's own young collections out of the way (a threshold no test allocates to)."""
    before = gc.get_threshold()
    gc.collect()
    gc.set_threshold(10**9, 10**6, 10**6)
    try:
        yield
    finally:
        gc.set_threshold(*before)


async def wait_until(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_garbage_cycles_are_collected_by_the_clock_not_only_by_the_allocation_count(
    quiet_collector: None, settings: Any
) -> None:
    settings.NEXCOMPUTE_GC_PACE_SECONDS = 0.02
    # Without the pacer a dropped cycle stays: CPython's count never reaches its threshold
    # (the churn of a beating fleet: as many objects freed as made).
    left = cycle()
    await asyncio.sleep(0.3)
    assert left() is not None
    paced_before = sample("nexcompute_gc_pause_seconds_count", generation="0", by="pacer")
    middle_before = sample("nexcompute_gc_pause_seconds_count", generation="1", by="pacer")
    lag_before = sample("nexcompute_event_loop_lag_seconds_count")
    pacer = GcPacer()
    pacer.ensure_running()
    try:
        await wait_until(lambda: left() is None)
        # The middle generation every fourth time, and every tick counted for /metrics.
        await wait_until(lambda: pacer.collections >= 8)
        paced = sample("nexcompute_gc_pause_seconds_count", generation="0", by="pacer")
        middle = sample("nexcompute_gc_pause_seconds_count", generation="1", by="pacer")
        assert paced - paced_before >= 5
        assert middle - middle_before >= 1
        assert paced - paced_before >= 2 * (middle - middle_before)
        assert sample("nexcompute_event_loop_lag_seconds_count") - lag_before >= 8
        pacer.ensure_running()  # idempotent: still one task
        assert gc.callbacks.count(pacer._callback) == 1
    finally:
        pacer.stop()
    assert pacer._callback not in gc.callbacks


async def test_collections_cpython_starts_itself_are_reported_apart(
    quiet_collector: None, settings: Any
) -> None:
    settings.NEXCOMPUTE_GC_PACE_SECONDS = 0.05
    before = sample("nexcompute_gc_pause_seconds_count", generation="0", by="threshold")
    pacer = GcPacer()
    pacer.ensure_running()
    try:
        gc.set_threshold(500, 10**6, 10**6)  # a young collection after 500 allocations
        kept = [Node() for _ in range(2000)]
        assert kept
        await wait_until(
            lambda: (
                sample("nexcompute_gc_pause_seconds_count", generation="0", by="threshold") > before
            )
        )
    finally:
        pacer.stop()


async def test_pacing_is_off_at_zero(settings: Any) -> None:
    settings.NEXCOMPUTE_GC_PACE_SECONDS = 0
    pacer = GcPacer()
    pacer.ensure_running()
    assert pacer.task is None
    assert pacer._callback not in gc.callbacks


async def test_no_paced_collection_while_cpython_collects_often_enough(
    quiet_collector: None, settings: Any
) -> None:
    """Agents arriving make CPython collect by its own count; the pacer adds nothing then, and
    takes over again once those stop."""
    settings.NEXCOMPUTE_GC_PACE_SECONDS = 0.1
    pacer = GcPacer()
    pacer.ensure_running()
    try:
        await wait_until(lambda: pacer.collections >= 2)  # pacing while nothing else collects
        before = pacer.collections
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.0
        while loop.time() < until:  # collections by someone else, every 0.03 s for 1 s
            gc.collect(1)
            await asyncio.sleep(0.03)
        assert pacer.collections == before
        await wait_until(lambda: pacer.collections > before)
    finally:
        pacer.stop()
