"""Heartbeat metrics off the per-beat path.

Two flushes per server process, each a plain function of one batch so more can hook in:

- ``flush_live``: every NEXCOMPUTE_METRICS_LIVE_SECONDS (1 s) the newest figures of the
  machines that beat since go to one Redis hash in one ``HSET``; ``GET /api/machines`` reads
  them from there (``live_metrics``), so the API is at most about a second behind the last
  heartbeat, from any web process.
- ``flush_to_database``: every NEXCOMPUTE_METRICS_WRITE_SECONDS (60 s) the same figures and
  last-seen times are written to the machine rows in bulk (the durable copy, and what the
  dashboards' first page load shows).

Neither runs per beat: thousands of agents cost one Redis command a second and a handful of
SQL statements a minute.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Iterable
from functools import cache
from typing import Any

import redis
import redis.asyncio as aioredis
from django.conf import settings
from django.db import connection
from django.dispatch import Signal

log = logging.getLogger(__name__)

# Sent (in a worker thread) after each chunk of heartbeats is written, with ``batch``: the
# chunk, ``{machine_id: (metrics, seen)}``. The staff reports keep the load history from it.
metrics_flushed = Signal()

Batch = dict[int, tuple[dict[str, Any], dt.datetime]]
"""machine id -> (metrics, the time of the heartbeat that carried them)."""


def live_key() -> str:
    """One hash per database and channel prefix: test runs (and deployments) sharing one Redis
    never read each other's machines."""
    layer: dict[str, Any] = settings.CHANNEL_LAYERS["default"]
    prefix = layer.get("CONFIG", {}).get("prefix", "asgi")
    return f"nexcompute:{connection.settings_dict['NAME']}:{prefix}:live"


def _encode(metrics: dict[str, Any], seen: dt.datetime) -> str:
    return json.dumps({"m": metrics, "t": seen.isoformat()})


async def flush_live(client: aioredis.Redis, key: str, batch: Batch) -> None:
    """The newest figures of ``batch`` into Redis, one command for all of them."""
    if batch:
        await client.hset(key, mapping={str(mid): _encode(m, t) for mid, (m, t) in batch.items()})


def flush_to_database(batch: Batch) -> int:
    """The durable write of one batch (a thread of the pool runs it)."""
    from machines.services import machines_record_heartbeats

    return machines_record_heartbeats(batch)


@cache
def _sync_client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=0.5, socket_connect_timeout=0.5)


def live_metrics(machine_ids: Iterable[int]) -> dict[int, tuple[dict[str, Any], dt.datetime]]:
    """The newest figures Redis holds for these machines; empty if Redis cannot answer (the
    rows' figures, at most a minute old, then stand)."""
    ids = [str(mid) for mid in machine_ids]
    if not ids:
        return {}
    try:
        raw = _sync_client().hmget(live_key(), ids)
    except redis.RedisError as exc:
        log.warning("live metrics unavailable: %s", exc)
        return {}
    out: dict[int, tuple[dict[str, Any], dt.datetime]] = {}
    for mid, value in zip(ids, raw, strict=True):
        if value:
            data = json.loads(value)
            out[int(mid)] = (data["m"], dt.datetime.fromisoformat(data["t"]))
    return out


class MetricsWriter:
    """Per server process: the latest metrics and last-seen time of each connected machine,
    flushed to Redis every second and to the database every minute (module docstring)."""

    CHUNK = 100

    def __init__(self) -> None:
        self.pending: Batch = {}
        self.live: Batch = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    def update(self, machine_id: int, *, metrics: dict[str, Any], seen: dt.datetime) -> None:
        self.pending[machine_id] = (metrics, seen)
        self.live[machine_id] = (metrics, seen)
        loop = asyncio.get_running_loop()
        if self.loop is not loop or any(task.done() for task in self.tasks) or not self.tasks:
            for task in self.tasks:
                task.cancel()
            self.loop = loop
            self.tasks = [
                loop.create_task(self._run_database()),
                loop.create_task(self._run_live()),
            ]

    async def _run_live(self) -> None:
        key = await asyncio.to_thread(live_key)  # reads Django's connection settings
        client = aioredis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2
        )
        failing = False
        try:
            while True:
                await asyncio.sleep(settings.NEXCOMPUTE_METRICS_LIVE_SECONDS)
                batch, self.live = self.live, {}
                try:
                    await flush_live(client, key, batch)
                    failing = False
                except (redis.RedisError, OSError) as exc:
                    if not failing:  # once per outage, not once a second
                        log.warning("live metrics to Redis failed: %s", exc)
                    failing = True
        finally:
            await client.aclose()

    async def _run_database(self) -> None:
        from channels.db import database_sync_to_async

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
                    await database_sync_to_async(flush_to_database, thread_sensitive=False)(chunk)
                    await database_sync_to_async(metrics_flushed.send, thread_sensitive=False)(
                        sender=MetricsWriter, batch=chunk
                    )
                except Exception:  # the next write carries fresher numbers anyway
                    log.exception("metrics write failed")
                await asyncio.sleep(0.02)


metrics_writer = MetricsWriter()
