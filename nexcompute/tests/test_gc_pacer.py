"""Garbage collection by the clock in web processes (nexcompute/gc_pacer.py)."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from nexcompute.gc_pacer import MIDDLE_EVERY, GcPacer
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


def pauses(generation: str, by: str) -> float:
    return sample("nexcompute_gc_pause_seconds_count", generation=generation, by=by)


@pytest.fixture
def quiet_collector() -> Iterator[None]:
    """CPython's own collections out of the way: a threshold no test allocates to, the way a
    beating fleet frees as many objects as it makes and its count never gets there."""
    before = gc.get_threshold()
    gc.collect()
    gc.set_threshold(10**9, 10**6, 10**6)
    try:
        yield
    finally:
        gc.set_threshold(*before)


async def wait_until(check: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_garbage_cycles_are_collected_by_the_clock_not_only_by_the_allocation_count(
    quiet_collector: None, settings: Any
) -> None:
    settings.NEXCOMPUTE_GC_PACE_SECONDS = 0.02
    left = cycle()  # dropped: only a collection frees it, and CPython's count will not start one
    young, middle = pauses("0", "pacer"), pauses("1", "pacer")
    by_count = pauses("0", "threshold") + pauses("1", "threshold")
    lag = sample("nexcompute_event_loop_lag_seconds_count")
    pacer = GcPacer()
    pacer.ensure_running()
    try:
        await wait_until(lambda: left() is None)
        # Both generations in turn, each tick's lag counted for /metrics, and the pacer's own
        # collections not reported as CPython's.
        await wait_until(lambda: pauses("0", "pacer") > young and pauses("1", "pacer") > middle)
        assert sample("nexcompute_event_loop_lag_seconds_count") > lag
        assert pauses("0", "threshold") + pauses("1", "threshold") == by_count
        pacer.ensure_running()  # idempotent: still one task, one callback
        assert gc.callbacks.count(pacer._callback) == 1
    finally:
        pacer.stop()
    assert pacer._callback not in gc.callbacks


async def test_collections_cpython_starts_itself_are_reported_apart(
    quiet_collector: None, settings: Any
) -> None:
    settings.NEXCOMPUTE_GC_PACE_SECONDS = 3600  # the pacer itself never collects here
    before, paced = pauses("0", "threshold"), pauses("0", "pacer")
    pacer = GcPacer()
    pacer.ensure_running()
    try:
        gc.set_threshold(500, 10**6, 10**6)  # a young collection after 500 allocations
        kept = [Node() for _ in range(2000)]
        assert kept
        gc.set_threshold(10**9, 10**6, 10**6)
        assert pacer.automatic  # noted by the callback, reported at the next tick
        assert all(generation == 0 for generation, _ in pacer.automatic)
        assert pauses("0", "threshold") == before
    finally:
        pacer.stop()
    assert pauses("0", "pacer") == paced


def test_only_what_nobody_collected_for_its_period_is_due(quiet_collector: None) -> None:
    pace = 0.5
    pacer = GcPacer()
    pacer.last = [100.0, 100.0]
    assert pacer.due(100.4, pace) is None
    assert pacer.due(100.5, pace) == 0
    pacer.last[0] = 101.5
    assert pacer.due(101.9, pace) is None
    assert pacer.due(100.0 + pace * MIDDLE_EVERY, pace) == 1
    # Someone else's collection (CPython's count, agents arriving) resets both clocks: nothing
    # is due then.
    gc.callbacks.append(pacer._callback)
    try:
        gc.collect(1)
    finally:
        gc.callbacks.remove(pacer._callback)
    assert pacer.due(time.monotonic(), pace) is None
    assert pacer.due(time.monotonic() + pace, pace) == 0
    assert pacer.due(time.monotonic() + pace * MIDDLE_EVERY, pace) == 1


async def test_pacing_is_off_at_zero(settings: Any) -> None:
    settings.NEXCOMPUTE_GC_PACE_SECONDS = 0
    pacer = GcPacer()
    pacer.ensure_running()
    assert pacer.task is None
    assert pacer._callback not in gc.callbacks
