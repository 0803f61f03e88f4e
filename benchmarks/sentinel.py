"""The cost of ``semaphore_redis_wait_replicas``: gated calls per second with and without WAIT.

``python -m benchmarks.sentinel [--calls N] [--rounds R]`` starts a private master and one
replica of it on loopback and drives one gate group directly (no Celery): each call is an
acquire, a start and a release, the three scripts a gated task runs. With
``wait_replicas = 1`` every script is followed by ``WAIT 1`` on the same connection, which
answers once the replica acknowledged the change. The rounds alternate between the two
settings so both see the same machine, and the best round of each is reported: on a shared
host the best round is the one least disturbed by other processes.
"""

from __future__ import annotations

import argparse
import time
import uuid
from dataclasses import dataclass

import redis

from celery_semaphore.group import Acquired, Group, Started
from celery_semaphore.scripts import Scripts
from celery_semaphore.server import start_private_redis

from .calls import acquire

__all__ = ["Cost", "gated_calls", "main", "measure"]


@dataclass(frozen=True)
class Cost:
    """Gated calls per second without and with ``WAIT 1`` after each script."""

    plain: float
    waited: float

    @property
    def ratio(self) -> float:
        return self.waited / self.plain

    @property
    def extra_ms(self) -> float:
        """What WAIT adds to one call (three scripts), in milliseconds."""
        return 1000.0 / self.waited - 1000.0 / self.plain

    def lines(self) -> list[str]:
        return [
            f"acquire+start+release, wait_replicas=0: {self.plain:8.0f} calls/s "
            f"({1000 / self.plain:.3f} ms per call)",
            f"acquire+start+release, wait_replicas=1: {self.waited:8.0f} calls/s "
            f"({1000 / self.waited:.3f} ms per call)",
            f"with / without: {self.ratio:.2f}; WAIT adds {self.extra_ms:.3f} ms per call "
            "(3 WAITs)",
        ]


def gated_calls(group: Group, calls: int, limit: int = 4) -> float:
    """Run ``calls`` calls through ``group`` one after another; returns calls per second."""
    runner = f"bench:{uuid.uuid4().hex[:6]}"
    began = time.perf_counter()
    for i in range(calls):
        task_id = f"c{i}-{runner}"
        admission = acquire(group, task_id, ["work"], [limit])
        assert admission[0] is Acquired.GRANTED, admission
        assert group.start(task_id, runner)[0] is Started.RUN
        assert group.release(task_id).released
    return calls / (time.perf_counter() - began)


def measure(client: redis.Redis, calls: int = 300, rounds: int = 8, prefix: str = "") -> Cost:
    """Best rate of ``rounds`` rounds of ``calls`` calls on ``client``'s server, without and
    with ``wait_replicas = 1`` (the server must have a replica in sync for the latter)."""
    scripts = Scripts(client)
    prefix = prefix or f"bench{uuid.uuid4().hex[:6]}"
    groups = [
        Group(client, scripts, "work", prefix=prefix, wait_replicas=wait, history_s=0)
        for wait in (0, 1)
    ]
    gated_calls(groups[0], 20)  # scripts loaded, connection open
    best = [0.0, 0.0]
    for _ in range(rounds):
        for i, group in enumerate(groups):
            best[i] = max(best[i], gated_calls(group, calls))
    return Cost(best[0], best[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sentinel", description=__doc__)
    parser.add_argument("--calls", type=int, default=300, help="calls per round")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per setting")
    options = parser.parse_args(argv)
    master = start_private_redis()
    replica = start_private_redis()
    try:
        client = redis.Redis.from_url(master.url)
        redis.Redis.from_url(replica.url).replicaof("127.0.0.1", master.port)
        deadline = time.monotonic() + 20
        while redis.Redis.from_url(replica.url).info("replication")["master_link_status"] != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync")
            time.sleep(0.05)
        cost = measure(client, options.calls, options.rounds)
        print(
            f"master {master.url}, one replica, loopback; best of {options.rounds} rounds of "
            f"{options.calls} calls"
        )
        for line in cost.lines():
            print(line)
    finally:
        replica.stop()
        master.stop()


if __name__ == "__main__":
    main()
