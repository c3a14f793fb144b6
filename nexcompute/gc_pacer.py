"""Paced garbage collection for a web process's event loop, and how late that loop runs.

CPython's cyclic collector starts a young collection when allocations minus deallocations of
tracked objects pass a threshold (50,000 here, ``nexcompute/asgi.py``). A web process holding
thousands of agent websockets churns medium-lived objects: every beat wakes its connection,
which frees the futures, tasks and handles it waited on since the last beat (promoted long
ago) and makes new ones. The two cancel out in that count, so the young generation fills with
waiting objects far past the threshold before anything collects it: measured 120,000-365,000
objects per young collection at 10,000 agents (0.1-0.35 s with the loop stopped), and the
middle generation's walks 340,000-440,000 objects (0.33-0.57 s); such a pause inside
``bench/fleet.py``'s window decided its p99.

So this task collects by the clock as well as by that count: the young generation when none
was collected for ``NEXCOMPUTE_GC_PACE_SECONDS`` (0.5 s), the middle one when none was for four
times that, each walk then covering only what was made since (at 10,000 agents: the middle
generation's walks 55,000-75,000 objects, 0.04-0.09 s). While allocations run ahead (agents
arriving) CPython's count collects often enough and the task adds nothing. Full collections
keep CPython's own rule (rare; they walk everything).

It also reports, for ``/metrics``, how late it woke (the event loop's lag, whatever the cause)
and how long each collection held the loop, the paced ones and those CPython started itself.
The collector's callback only notes a duration in a list: it must take no lock (a collection
can start inside prometheus-client's own locked code in this very thread).
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any

from django.conf import settings

from nexcompute.metrics import EVENT_LOOP_LAG, GC_PAUSE

MIDDLE_EVERY = 4  # the middle generation is due after four paces without a collection of it


class GcPacer:
    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # The running collection's start (perf_counter, monotonic); None until one is seen.
        self.started_at: float | None = None
        self.started_mono = 0.0
        self.automatic: list[tuple[int, float]] = []  # (generation, seconds), from the callback
        self.pacing: int | None = None  # the thread collecting for the pacer, while it does
        # When the young and the middle generation were last collected, by anyone.
        self.last = [time.monotonic(), time.monotonic()]

    def ensure_running(self) -> None:
        """Start the task on the running loop (once per loop; idempotent)."""
        if settings.NEXCOMPUTE_GC_PACE_SECONDS <= 0:
            return
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done() or self.loop is not loop:
            self.loop = loop
            if self._callback not in gc.callbacks:
                gc.callbacks.append(self._callback)
            self.task = loop.create_task(self._run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started_at = time.perf_counter()
            self.started_mono = time.monotonic()
            return
        if self.started_at is None:  # registered while another thread was collecting
            return
        generation = info["generation"]
        for covered in range(min(generation, 1) + 1):  # a collection takes the younger ones too
            self.last[covered] = self.started_mono
        if self.pacing != threading.get_ident() and len(self.automatic) < 1000:
            self.automatic.append((generation, time.perf_counter() - self.started_at))

    def due(self, now: float, pace: float) -> int | None:
        """The generation to collect now, if any: what nobody collected for its period."""
        if now - self.last[1] >= pace * MIDDLE_EVERY:
            return 1
        if now - self.last[0] >= pace:
            return 0
        return None

    def _collect(self, generation: int) -> None:
        self.pacing = threading.get_ident()  # its own collections are timed here
        t0 = time.perf_counter()
        try:
            gc.collect(generation)
        finally:
            self.pacing = None
        GC_PAUSE.labels(generation=str(generation), by="pacer").observe(time.perf_counter() - t0)

    async def _run(self) -> None:
        pace = settings.NEXCOMPUTE_GC_PACE_SECONDS
        while True:
            asked = time.monotonic()
            await asyncio.sleep(pace)
            now = time.monotonic()
            EVENT_LOOP_LAG.observe(max(0.0, now - asked - pace))
            # Only what CPython has not collected lately: while agents connect, its own count
            # collects often enough, and a paced collection on top would only add work.
            generation = self.due(now, pace)
            if generation is not None:
                self._collect(generation)
            noted, self.automatic = self.automatic, []
            for collected, seconds in noted:
                GC_PAUSE.labels(generation=str(collected), by="threshold").observe(seconds)


pacer = GcPacer()
