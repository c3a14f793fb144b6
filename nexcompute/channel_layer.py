"""The channel layer every web process shares: channels-redis' ``RedisChannelLayer`` with a
bounded, *waiting* Redis connection pool.

channels-redis builds a plain redis-py ``ConnectionPool`` per event loop, which opens a new
connection for every concurrent call and raises ``MaxConnectionsError`` past its
``max_connections`` (PITFALLS). A connect storm (thousands of agents dialling a process after
another process died, each connection doing a ``group_send`` and a ``group_add``) then has
thousands of calls in flight at once: the pool ran dry at 1,000 and consumers died with
``Too many connections`` (bench/fleet.py at 5,000 agents). A ``BlockingConnectionPool`` makes
the excess calls queue for a connection instead (``pool_timeout`` seconds at most), and keeps
the number of Redis connections per process bounded and small.

redis-py's blocking pool waits on an ``asyncio.Condition``; on Python 3.11 and 3.12 a waiter
that is notified and then cancelled (its timeout, or daphne killing a consumer whose client
left) swallows the notification, and the free connection then sits idle while the others wait
out their timeout ("No connection available"). A waiter that gives up passes the wake-up on.

Why this layer and not ``RedisPubSubChannelLayer``: measured in bench/fleet.py and written up
in docs/deploy.md ("Channel layer").
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer
from channels_redis.core import RedisChannelLayer as _RedisChannelLayer
from redis import asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError


class WaitingConnectionPool(aioredis.BlockingConnectionPool):
    """redis-py's blocking pool, whose waiters pass on a wake-up they cannot use."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)
        except (RedisConnectionError, asyncio.CancelledError):
            async with self._condition:
                self._condition.notify()
            raise


class RedisChannelLayer(_RedisChannelLayer):
    """``channels_redis.core.RedisChannelLayer`` whose pools wait for a free connection.

    Each entry of ``hosts`` is an address dict as channels-redis takes it, plus
    ``pool_timeout`` (seconds a call may wait for a connection; default 20).
    """

    def create_pool(self, index: int) -> aioredis.ConnectionPool:
        host: dict[str, Any] = dict(self.hosts[index])
        address = host.pop("address")
        timeout = host.pop("pool_timeout", 20)
        return WaitingConnectionPool.from_url(address, timeout=timeout, **host)

    async def group_join_alone(self, group: str, channel: str, message: dict[str, Any]) -> None:
        """Add ``channel`` to ``group`` and send ``message`` to every earlier member (see
        :func:`join_group_alone`)."""
        assert self.require_valid_group_name(group), "Group name not valid"
        assert self.require_valid_channel_name(channel), "Channel name not valid"
        connection = self.connection(self.consistent_hash(group))
        now = time.time()
        earlier = await connection.eval(
            _JOIN_ALONE_LUA,
            1,
            self._group_key(group),
            channel,
            now,
            int(now) - self.group_expiry,
            self.group_expiry,
        )
        for member in earlier:
            try:
                await self.send(member.decode(), message)
            except ChannelFull:  # a stale connection not reading: its watchdog ends it
                pass


# One round trip: the group's live members other than ``channel`` (expired entries dropped, as
# channels-redis' group_send does), then ``channel`` joins and the group's expiry is renewed.
_JOIN_ALONE_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[3])
local earlier = {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if member ~= ARGV[1] then table.insert(earlier, member) end
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return earlier
"""


async def join_group_alone(
    layer: BaseChannelLayer, group: str, channel: str, message: dict[str, Any]
) -> None:
    """``channel`` joins ``group`` and every earlier member gets ``message`` (one live agent
    connection per machine: the newest tells the older ones to go, in any server process).

    On this module's layer it is one Redis round trip (a Lua script) instead of four
    (group_send's two, group_add's two). A connect storm holds a pool connection for each
    round trip, and each round trip waits for a turn of the busy event loop: with four, a
    single process's pool ran dry at 133 connects a second and consumers died after waiting
    20 s for a connection (bench/fleet.py, README "Several web processes"). Being one script,
    two connections of one machine arriving at once also always see each other (the later
    one tells the earlier to go), where send-then-add let both miss the other. Other layers
    (pub/sub, in-memory) get the send-then-add they support.
    """
    if isinstance(layer, RedisChannelLayer):
        await layer.group_join_alone(group, channel, message)
        return
    await layer.group_send(group, message)
    await layer.group_add(group, channel)
