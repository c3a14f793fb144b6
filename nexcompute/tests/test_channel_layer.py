"""The channel layer's "one live connection per machine" join, against the real Redis.

``join_group_alone`` is what an agent connection does at connect: it joins its machine's group
and tells every earlier member (an older connection of the same machine, in any process) to go.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer
from django.conf import settings

from nexcompute.channel_layer import RedisChannelLayer, join_group_alone

GROUP = "machine-1"


def told_by(channel: str) -> dict[str, Any]:
    return {"type": "agent.disconnect", "by": channel}


@pytest.fixture
async def layer() -> AsyncIterator[RedisChannelLayer]:
    """The layer as settings build it, on a prefix of its own in the shared Redis."""
    layers: Any = settings.CHANNEL_LAYERS
    config: dict[str, Any] = dict(layers["default"]["CONFIG"])
    layer = RedisChannelLayer(**{**config, "prefix": f"test{uuid.uuid4().hex[:12]}"})
    assert isinstance(layer, RedisChannelLayer), "the settings' layer is this module's"
    yield layer
    await layer.flush()


async def receive(layer: Any, channel: str) -> dict[str, Any]:
    message: dict[str, Any] = await asyncio.wait_for(layer.receive(channel), timeout=10)
    return message


async def told_before(layer: Any, channel: str, sentinel: str) -> list[str]:
    """Who told ``channel`` to go, up to and without the sentinel's message."""
    senders = []
    while (message := await receive(layer, channel))["by"] != sentinel:
        senders.append(message["by"])
    return senders


async def test_a_newer_member_tells_the_earlier_one_and_not_itself(
    layer: RedisChannelLayer,
) -> None:
    first, second, third = [await layer.new_channel() for _ in range(3)]
    await join_group_alone(layer, GROUP, first, told_by(first))
    await join_group_alone(layer, GROUP, second, told_by(second))
    assert await receive(layer, first) == told_by(second)
    # The second was not told by its own join: the first message it gets is the third's.
    await join_group_alone(layer, GROUP, third, told_by(third))
    assert await receive(layer, second) == told_by(third)
    assert await receive(layer, first) == told_by(third)  # still a member until it leaves


async def test_a_join_is_one_round_trip_to_redis(layer: RedisChannelLayer) -> None:
    channel = await layer.new_channel()
    connection = layer.connection(layer.consistent_hash(GROUP))
    commands: list[str] = []
    original = connection.execute_command

    async def counting(*args: Any, **options: Any) -> Any:
        commands.append(str(args[0]))
        return await original(*args, **options)

    connection.execute_command = counting
    try:
        # What the join replaces: group_send and group_add, four round trips.
        await layer.group_send(GROUP, told_by(channel))
        await layer.group_add(GROUP, channel)
        assert len(commands) == 4, commands
        await layer.group_discard(GROUP, channel)
        commands.clear()

        await join_group_alone(layer, GROUP, channel, told_by(channel))
        assert commands == ["EVAL"], commands
    finally:
        del connection.execute_command


async def test_connections_arriving_at_once_leave_exactly_one_untold(
    layer: RedisChannelLayer,
) -> None:
    """The attack on "one live connection per machine": two connections of one machine (a
    stolen credential beside the real agent, or a reconnect racing the old socket) arrive at
    once, and each must see the other."""
    # First, the way it was done before (group_send, then group_add), interleaved as two
    # consumers on one event loop can be: neither is told, both stay connected.
    a, b, sentinel = [await layer.new_channel() for _ in range(3)]
    await layer.group_send(GROUP, told_by(a))
    await layer.group_send(GROUP, told_by(b))
    await layer.group_add(GROUP, a)
    await layer.group_add(GROUP, b)
    await layer.group_send(GROUP, told_by(sentinel))
    assert await told_before(layer, a, sentinel) == []
    assert await told_before(layer, b, sentinel) == []
    await layer.group_discard(GROUP, a)
    await layer.group_discard(GROUP, b)

    # The join: thirty at once, each sees every one that joined before it, so only the last
    # one is left untold.
    channels = [await layer.new_channel() for _ in range(30)]
    await asyncio.gather(*(join_group_alone(layer, GROUP, c, told_by(c)) for c in channels))
    await join_group_alone(layer, GROUP, sentinel, told_by(sentinel))
    told = {c: await told_before(layer, c, sentinel) for c in channels}
    untold = [c for c, senders in told.items() if not senders]
    assert len(untold) == 1, told
    # And whoever told a channel joined after it: the untold one told every other.
    assert all(untold[0] in senders for c, senders in told.items() if c != untold[0])


async def test_other_layers_get_send_then_add() -> None:
    layer = InMemoryChannelLayer()
    first, second = [await layer.new_channel() for _ in range(2)]
    await join_group_alone(layer, GROUP, first, told_by(first))
    await join_group_alone(layer, GROUP, second, told_by(second))
    assert await receive(layer, first) == told_by(second)
