"""Coalesced dashboard feed: per server process, one batched update per interval.

Every heartbeat updates an in-memory dict; a single task per process flushes the dict to the
dashboard group every ``NEXCOMPUTE_DASHBOARD_BATCH_SECONDS``. Dashboards thus receive one
message per interval per server process (one per 1,000 machines changed in it), whatever the
number of beats (PITFALLS: a message per heartbeat overruns channels-redis near 3,000 agents
and drops silently past capacity).

The lowest part of the dashboard: the agent link feeds it, and it imports no app.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings

from nexcompute.realtime import DASHBOARD_GROUP

log = logging.getLogger(__name__)

# Machines per dashboard message. A fleet connecting at once changes every machine within one
# interval: 10,000 of them in one message was 1.06 MB, past daphne's websocket message limit
# (1 MiB), and the staff dashboard's socket was closed with an error (bench/fleet.py). About
# 110 bytes each: 1,000 make a message of about 110 kB.
MACHINES_PER_MESSAGE = 1000


class DashboardBatcher:
    def __init__(self) -> None:
        self.pending: dict[int, dict[str, Any]] = {}
        self.task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def update(
        self,
        machine_id: int,
        *,
        last_seen: dt.datetime,
        metrics: dict[str, Any] | None = None,
        status: str | None = None,
        owner_present: bool | None = None,
    ) -> None:
        """Queue the latest view of a machine; later calls in one interval merge into it."""
        entry = self.pending.setdefault(machine_id, {"id": machine_id})
        entry["last_seen"] = last_seen.isoformat()
        if metrics is not None:
            entry["metrics"] = metrics
        if status is not None:
            entry["status"] = status
        if owner_present is not None:
            entry["owner_present"] = owner_present
        self._ensure_task()

    def _ensure_task(self) -> None:
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done() or self.loop is not loop:
            self.loop = loop
            self.task = loop.create_task(self._run())

    async def _run(self) -> None:
        interval = settings.NEXCOMPUTE_DASHBOARD_BATCH_SECONDS
        layer = get_channel_layer()
        while True:
            await asyncio.sleep(interval)
            if not self.pending or layer is None:
                continue
            batch, self.pending = list(self.pending.values()), {}
            for start in range(0, len(batch), MACHINES_PER_MESSAGE):
                part = batch[start : start + MACHINES_PER_MESSAGE]
                try:
                    await layer.group_send(
                        DASHBOARD_GROUP, {"type": "dashboard.machines", "machines": part}
                    )
                except Exception:  # keep batching; the next flush carries fresher numbers
                    log.exception("dashboard flush failed")


batcher = DashboardBatcher()
