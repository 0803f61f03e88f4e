"""The workaround people write without celery_semaphore: a Redis semaphore inside the task body.

A task takes a slot at its start; when none is free it calls ``self.retry()`` and runs again
later. The semaphore itself is written to be as cheap as it can be (one script per acquire,
leases so a crashed holder does not leak a slot), so the comparison measures the retry
pattern, not a clumsy lock.
"""

from __future__ import annotations

import redis

__all__ = ["InTaskSemaphore"]

# One round trip: drop expired leases, then take a slot if one is free.
_ACQUIRE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  return 1
end
return 0
"""


class InTaskSemaphore:
    """A counting semaphore of leases in one Redis sorted set.

    Args:
        client: a redis-py client.
        lease_s: how long a slot stays held if its holder never releases it.

    Each method names the sorted set (``token -> lease deadline (ms)``) of the semaphore.
    """

    def __init__(self, client: redis.Redis, lease_s: float = 60.0) -> None:
        self.client = client
        self.lease_ms = int(lease_s * 1000)
        self._acquire = client.register_script(_ACQUIRE)

    def acquire(self, key: str, token: str, limit: int) -> bool:
        """Take one of ``limit`` slots of ``key`` for ``token``; returns whether one was free."""
        return bool(self._acquire(keys=[key], args=[token, limit, self.lease_ms]))

    def release(self, key: str, token: str) -> None:
        """Give the slot of ``token`` back (a no-op when it holds none)."""
        self.client.zrem(key, token)
