"""Core throughput per deployment: one Redis, Sentinel, Redis Cluster, each with and without
``semaphore_redis_wait_replicas = 1`` where replicas exist (issue 14's table).

``python -m benchmarks.deployments``: a gated call's three scripts (acquire, start, release)
at the Group level, one round trip each, in a loop, against each deployment started on
loopback (the same servers the tests use: tests/sentinelkit.py, tests/clusterkit.py); the
deployments are measured in turn, round after round, so a busy machine slows them alike.
Prints a Markdown table of calls per second (median of the rounds) and the ratio to one Redis.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from celery_semaphore.connect import connect
from celery_semaphore.group import Group
from celery_semaphore.scripts import Scripts
from celery_semaphore.server import start_private_redis
from celery_semaphore.spec import CallSpec
from tests.clusterkit import LocalCluster
from tests.sentinelkit import Deployment


def _rate(client: Any, calls: int, wait: int, cluster: bool, tag: str) -> float:
    group = Group(
        client, Scripts(client), f"d{tag}", prefix="deploy", history_s=0, wait_replicas=wait,
        cluster=cluster,
    )  # fmt: skip
    spec = CallSpec(("",), (1,), (0,), 0, 30_000, False).to_json((group.name,), task="bench")
    began = time.perf_counter()
    for i in range(calls):
        task_id = f"{tag}-{i}"
        group.acquire(task_id, spec, [4], b"m", lease_ms=30_000)
        group.start(task_id, "bench")
        group.release(task_id)
    return calls / (time.perf_counter() - began)


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deployments")
    parser.add_argument("--calls", type=int, default=500, help="calls per round and deployment")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        single = start_private_redis()
        sentinel = Deployment(Path(tmp) / "sentinel")
        cluster = LocalCluster(Path(tmp) / "cluster")
        try:
            sentinel.start()
            sentinel.ready()
            cluster.start()
            clients = {
                "one Redis": (connect(single.url), False, 0),
                "Sentinel": (connect(sentinel.url), False, 0),
                "Sentinel, wait_replicas=1": (connect(sentinel.url), False, 1),
                "Cluster": (connect(cluster.url()), True, 0),
                "Cluster, wait_replicas=1": (connect(cluster.url()), True, 1),
            }
            rates: dict[str, list[float]] = {name: [] for name in clients}
            for r in range(args.rounds):
                for n, (name, (client, is_cluster, wait)) in enumerate(clients.items()):
                    rates[name].append(_rate(client, args.calls, wait, is_cluster, f"{r}{n}"))
        finally:
            cluster.stop()
            sentinel.stop()
            single.stop()
    base = statistics.median(rates["one Redis"])
    print("| Deployment | gated calls/s (acquire + start + release), median | ratio to one Redis |")
    print("|---|---:|---:|")
    for name, values in rates.items():
        median = statistics.median(values)
        spread = f"{min(values):,.0f}-{max(values):,.0f}"
        print(f"| {name} | {median:,.0f} ({spread}) | {median / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
