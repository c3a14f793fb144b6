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
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from channels_redis.core import RedisChannelLayer


class BlockingPoolRedisChannelLayer(RedisChannelLayer):
    def create_pool(self, index: int) -> aioredis.BlockingConnectionPool:
        host: dict[str, Any] = dict(self.hosts[index])
        address = host.pop("address")
        max_connections = host.pop("max_connections", 50)
        timeout = host.pop("pool_timeout", 20.0)
        return aioredis.BlockingConnectionPool.from_url(
            address, max_connections=max_connections, timeout=timeout, **host
        )
