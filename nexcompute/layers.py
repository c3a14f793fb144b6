"""The channel layer: channels-redis with a bounded, blocking Redis connection pool.

channels-redis builds a plain redis-py pool, which opens a new connection whenever every open
one is busy and raises ``MaxConnectionsError`` past ``max_connections``. In a connect storm
(thousands of agents after a server restart) that is a feedback loop: the event loop falls
behind, each Redis call takes longer, more calls overlap, the pool opens more connections
(each costs a TCP connect and three round trips of handshake on the same busy loop) until it
hits the cap and every further consumer dies with ``MaxConnectionsError`` (PITFALLS).

Here the pool holds at most ``max_connections`` connections and a call that finds them all
busy waits (up to ``pool_timeout`` seconds) for one to come back: a few dozen connections
serve thousands of consumers, since each call holds one for a single round trip.

redis-py's blocking pool waits on an ``asyncio.Condition``; on Python 3.11 and 3.12 a waiter
that is notified and then cancelled (its timeout, or daphne killing a consumer whose client
left) swallows the notification, and the free connection then sits idle while the others wait
out their timeout ("No connection available"). A waiter that gives up passes the wake-up on.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from channels_redis.core import RedisChannelLayer
from redis.exceptions import ConnectionError as RedisConnectionError


class _BlockingConnectionPool(aioredis.BlockingConnectionPool):
    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)
        except (RedisConnectionError, asyncio.CancelledError):
            # Whatever this waiter may have been woken for goes to the next one.
            async with self._condition:
                self._condition.notify()
            raise


class BlockingPoolRedisChannelLayer(RedisChannelLayer):
    def create_pool(self, index: int) -> _BlockingConnectionPool:
        host: dict[str, Any] = dict(self.hosts[index])
        address = host.pop("address")
        max_connections = host.pop("max_connections", 200)
        timeout = host.pop("pool_timeout", 30.0)
        return _BlockingConnectionPool.from_url(
            address, max_connections=max_connections, timeout=timeout, **host
        )
