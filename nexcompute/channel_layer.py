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
from typing import Any

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
