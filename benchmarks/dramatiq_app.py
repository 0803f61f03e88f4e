"""Dramatiq's ``ConcurrentRateLimiter``, the optional peer: ``dramatiq benchmarks.dramatiq_app``.

Used the way Dramatiq's documentation shows: the actor takes the limiter inside its body;
when the limit is reached ``RateLimitExceeded`` makes the Retries middleware re-enqueue the
message with exponential backoff. The backoff starts at one task duration (passed as the
``min_backoff`` message option), which is kinder to Dramatiq than its 15 s default.
The worker builds the actors from the same ``BENCH_*`` variables as :mod:`benchmarks.proj`;
the harness calls :func:`create_actors` with its own URLs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.rate_limits import ConcurrentRateLimiter, RateLimitExceeded
from dramatiq.rate_limits.backends import RedisBackend

__all__ = ["Actors", "create_actors", "queue_name"]

# Dramatiq logs every retry at INFO; that logging is not part of what is compared.
logging.getLogger("dramatiq").setLevel(logging.WARNING)


def queue_name(prefix: str) -> str:
    """The Dramatiq queue of a run."""
    return f"{prefix}-dramatiq"


@dataclasses.dataclass
class Actors:
    """The broker and the two actors of a run."""

    broker: RedisBroker
    limited: Any
    ping: Any


def create_actors(broker_url: str, slots_url: str, probe_url: str, prefix: str) -> Actors:
    """Build the broker and the actors ``limited`` (rate-limited sleep) and ``ping``."""
    broker = RedisBroker(url=broker_url)
    dramatiq.set_broker(broker)
    backend = RedisBackend(url=slots_url)
    probe = redis.Redis.from_url(probe_url)
    limiters: dict[int, ConcurrentRateLimiter] = {}

    def limiter(limit: int) -> ConcurrentRateLimiter:
        if limit not in limiters:
            key = f"{prefix}:dramatiq:{limit}"
            limiters[limit] = ConcurrentRateLimiter(backend, key, limit=limit)
        return limiters[limit]

    def limited(ms: float, tag: str, limit: int) -> None:
        try:
            with limiter(limit).acquire():
                start = time.time()
                time.sleep(ms / 1000.0)
                end = time.time()
                probe.rpush(tag, f"{start:.6f} {end:.6f}")
        except RateLimitExceeded:
            probe.incr(f"{tag}:wasted")
            raise

    def ping(tag: str) -> None:
        probe.rpush(tag, "pong")

    queue = queue_name(prefix)
    return Actors(
        broker,
        dramatiq.actor(broker=broker, queue_name=queue, max_retries=100_000, max_backoff=1000)(
            limited
        ),
        dramatiq.actor(broker=broker, queue_name=queue, max_retries=0)(ping),
    )


if "BENCH_DRAMATIQ_BROKER" in os.environ:
    actors = create_actors(
        os.environ["BENCH_DRAMATIQ_BROKER"],
        os.environ["BENCH_SLOTS"],
        os.environ["BENCH_PROBE"],
        os.environ["BENCH_PREFIX"],
    )
