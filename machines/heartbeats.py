"""Heartbeat metrics off the per-beat path: written to the database in batches."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

from django.conf import settings
from django.dispatch import Signal

log = logging.getLogger(__name__)

# Sent (in a worker thread) after each chunk of heartbeats is written, with ``batch``: the
# chunk, ``{machine_id: (metrics, seen)}``. The staff reports keep the load history from it.
metrics_flushed = Signal()


class MetricsWriter:
    """Per server process: the latest metrics and last-seen time of each connected machine,
    written to the database in one bulk UPDATE every NEXCOMPUTE_METRICS_WRITE_SECONDS.

    Keeps the database out of the per-beat path: thousands of agents cost a handful of
    statements a minute instead of a thread hop and an UPDATE per machine.
    """

    CHUNK = 100

    def __init__(self) -> None:
        self.pending: dict[int, tuple[dict[str, Any], dt.datetime]] = {}
        self.task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def update(self, machine_id: int, *, metrics: dict[str, Any], seen: dt.datetime) -> None:
        self.pending[machine_id] = (metrics, seen)
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done() or self.loop is not loop:
            self.loop = loop
            self.task = loop.create_task(self._run())

    async def _run(self) -> None:
        from channels.db import database_sync_to_async

        from machines.services import machines_record_heartbeats

        while True:
            await asyncio.sleep(settings.NEXCOMPUTE_METRICS_WRITE_SECONDS)
            if not self.pending:
                continue
            batch, self.pending = self.pending, {}
            items = list(batch.items())
            # Small chunks with a pause between: one long write in a worker thread would hold
            # the GIL long enough to delay heartbeats on the event loop.
            for start in range(0, len(items), self.CHUNK):
                chunk = dict(items[start : start + self.CHUNK])
                try:
                    await database_sync_to_async(
                        machines_record_heartbeats, thread_sensitive=False
                    )(chunk)
                    await database_sync_to_async(metrics_flushed.send, thread_sensitive=False)(
                        sender=MetricsWriter, batch=chunk
                    )
                except Exception:  # the next write carries fresher numbers anyway
                    log.exception("metrics write failed")
                await asyncio.sleep(0.02)


metrics_writer = MetricsWriter()
