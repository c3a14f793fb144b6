"""The coalesced dashboard feed (dashboard/feed.py) when a whole fleet changes at once."""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import json
from typing import Any

import pytest
from channels.layers import get_channel_layer
from daphne.server import Server

from dashboard import feed
from nexcompute.realtime import DASHBOARD_GROUP


@pytest.fixture(autouse=True)
def _in_memory_layer(in_memory_layer: None) -> None:
    """The in-process channel layer (fixture in conftest.py)."""


def daphne_message_limit() -> int:
    """daphne's default websocket message size limit (``--websocket_max_message_size``)."""
    default = inspect.signature(Server).parameters["websocket_max_message_size"].default
    assert isinstance(default, int)
    return default


async def test_a_fleet_connecting_at_once_reaches_dashboards_in_messages_under_daphnes_limit(
    settings: Any,
) -> None:
    settings.NEXCOMPUTE_DASHBOARD_BATCH_SECONDS = 0.05
    layer = get_channel_layer()
    assert layer is not None
    channel = await layer.new_channel()
    await layer.group_add(DASHBOARD_GROUP, channel)
    seen = dt.datetime(2026, 12, 3, 6, 0, tzinfo=dt.UTC)
    metrics = {"cpu_percent": 12.5, "memory_percent": 40.0, "gpu_percent": 0.0, "load1": 0.7}
    n = 10_000
    # What one message of the whole batch would have been: past daphne's limit (the socket of
    # the staff dashboard was closed with an error when 10,000 agents connected in a minute).
    whole = [
        {"id": i, "last_seen": seen.isoformat(), "metrics": metrics, "status": "available"}
        for i in range(1, n + 1)
    ]
    sent = json.dumps({"type": "machines", "machines": whole})
    assert len(sent.encode()) > daphne_message_limit()

    batcher = feed.DashboardBatcher()
    for i in range(1, n + 1):
        batcher.update(i, last_seen=seen, metrics=metrics, status="available")
    got: dict[int, dict[str, Any]] = {}
    sizes = []
    try:
        while len(got) < n:
            message = await asyncio.wait_for(layer.receive(channel), 5)
            assert message["type"] == "dashboard.machines"
            sizes.append(len(json.dumps({"type": "machines", **message}).encode()))
            for machine in message["machines"]:
                assert machine["id"] not in got  # each machine once per interval
                got[machine["id"]] = machine
    finally:
        if batcher.task is not None:
            batcher.task.cancel()
            await asyncio.gather(batcher.task, return_exceptions=True)
    assert sorted(got) == list(range(1, n + 1))
    assert got[n] == whole[-1]
    assert len(sizes) == n // feed.MACHINES_PER_MESSAGE
    assert max(sizes) < daphne_message_limit() // 4
