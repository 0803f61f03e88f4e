"""The Celery app of the benchmark, loaded by the harness and by ``celery -A benchmarks.proj``.

Every task records itself with one ``RPUSH`` to the probe Redis at its end: ``"start end"``
(``time.time()`` taken inside the task) under the list named by its ``tag`` argument, so the
harness computes throughput and hand-off latency from timestamps the tasks took themselves.
The record costs the same one round trip in every variant, so ratios are unaffected by it.

Subprocess workers build the app from ``BENCH_*`` environment variables (see
:func:`app_from_env`); ``BENCH_GATED=0`` gives plain Celery: no ``@gated`` task and no
extension installed in the process.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping
from typing import Any

import redis
from celery import Celery, Task

from .lock import InTaskSemaphore

__all__ = ["GATES", "app_from_env", "create_app", "gated_task_name"]

#: The gates of the gated app: ``free`` is sized so that no batch fills it, ``limited`` has
#: the limit under test, ``one`` has a single slot (hand-off latency, full-gate submits).
GATES = ("free", "limited", "one")


def gated_task_name(gate: str) -> str:
    """Name of the gated task that holds a slot of ``gate``."""
    return f"bench.gated_{gate}"


def create_app(
    *,
    broker_url: str,
    slots_url: str,
    probe_url: str,
    prefix: str,
    limit: int,
    gated: bool,
    free_limit: int = 2000,
    lease_s: float = 30.0,
    default_queue: str | None = None,
    result_backend: str | None = None,
    prefetch: int = 0,
) -> Celery:
    """Build the benchmark app.

    Args:
        broker_url: the broker (a private Redis).
        slots_url: the Redis of the slots and of the in-task semaphore.
        probe_url: where tasks record their timestamps.
        prefix: key prefix of this run's slots.
        limit: limit of the gate ``limited`` and of the in-task semaphore under test.
        gated: whether to define the ``@gated`` tasks (which installs the extension).
        free_limit: limit of the gates ``free``, ``sapi`` and ``sdb``: more than any batch
            queues at once.
        lease_s: ``semaphore_lease``.
        default_queue: the queue ``.delay()`` sends to.
        result_backend: a result backend, for the chords of scenario 10's canvas (``None``:
            none, as in every other scenario).
        prefetch: ``semaphore_prefetch`` (calls held ahead of their grant, broker push only).

    Returns:
        The app, with tasks ``bench.plain``, ``bench.relay``, ``bench.locked`` and, when
        ``gated``, ``bench.gated_free``, ``bench.gated_limited``, ``bench.gated_one`` and
        ``bench.stacked`` (gates ``sapi``, keyed per tenant with a key limit, and ``sdb``,
        stacked in group ``stacked``).
        Scenario 10's nodes: ``bench.dag`` and, when ``gated``, ``bench.gated_dag`` (gate
        ``limited``).
    """
    app = Celery("bench", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        task_default_queue=default_queue or f"{prefix}.default",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        semaphore_redis_url=slots_url,
        semaphore_key_prefix=prefix,
        semaphore_limits={
            "free": free_limit,
            "limited": limit,
            "one": 1,
            "sapi": free_limit,
            "sdb": free_limit,
        },
        semaphore_lease=lease_s,
        semaphore_prefetch=prefetch,
    )
    if result_backend:
        app.conf.result_backend = result_backend
    probe = redis.Redis.from_url(probe_url)

    def record(tag: str, start: float, extra: str = "") -> None:
        # The end is taken before the write, the same way in every variant.
        end = time.time()
        probe.rpush(tag, f"{start:.6f} {end:.6f}{extra}")

    semaphore = InTaskSemaphore(redis.Redis.from_url(slots_url))

    @app.task(name="bench.plain", shared=False)
    def plain(ms: float, tag: str) -> None:
        start = time.time()
        if ms:
            time.sleep(ms / 1000.0)
        record(tag, start)

    @app.task(name="bench.relay", bind=True, shared=False)
    def relay(self: Task, ms: float, tag: str, chain: int, remaining: int) -> None:
        start = time.time()
        if ms:
            time.sleep(ms / 1000.0)
        record(tag, start, f" {chain} {remaining}")
        if remaining > 1:
            # Sent at the very end of the task, as a dispatch-on-release gate would.
            self.apply_async(
                (ms, tag, chain, remaining - 1), queue=self.request.delivery_info["routing_key"]
            )

    @app.task(name="bench.locked", bind=True, shared=False, max_retries=None)
    def locked(self: Task, ms: float, tag: str, limit: int, retry_ms: float) -> None:
        token = self.request.id
        key = f"{prefix}:in-task:{tag}"  # one semaphore per batch: nothing leaks between runs
        if not semaphore.acquire(key, token, limit):
            probe.incr(f"{tag}:wasted")
            # Jittered so retries do not come back in lockstep; about one task duration is
            # the most favourable delay for this workaround (Celery's default is 180 s).
            raise self.retry(countdown=retry_ms / 1000.0 * random.uniform(0.5, 1.5))
        try:
            start = time.time()
            if ms:
                time.sleep(ms / 1000.0)
            record(tag, start)
        finally:
            semaphore.release(key, token)

    @app.task(name="bench.dag", shared=False)
    def dag(*inputs: Any, ms: float, tag: str, node: str) -> str:
        # A node of scenario 10's canvas: its inputs (a chord's header results) come first.
        start = time.time()
        if ms:
            time.sleep(ms / 1000.0)
        record(tag, start, f" {node}")
        return node

    if gated:
        from celery_semaphore import gated as gate_decorator

        for gate in GATES:
            _define_gated(app, gate, gate_decorator, record)
        _define_stacked(app, gate_decorator, free_limit, record)
        _define_gated_dag(app, gate_decorator, record)
    return app


def _define_gated(app: Celery, gate: str, decorator: Any, record: Any) -> None:
    @decorator(gate)
    @app.task(name=gated_task_name(gate), shared=False)
    def run(ms: float, tag: str) -> None:
        start = time.time()
        if ms:
            time.sleep(ms / 1000.0)
        record(tag, start)


def _tenant(ms: float, tag: str, tenant: str = "t0") -> str:
    return tenant


def _define_stacked(app: Celery, decorator: Any, free_limit: int, record: Any) -> None:
    # Two gates in one group, the first with a key per tenant and a per-key limit; sized so
    # that no batch fills them (the cost of the common path, as for ``free``).
    @decorator("sapi", key=_tenant, key_limit=free_limit, group="stacked")
    @decorator("sdb", group="stacked")
    @app.task(name="bench.stacked", shared=False)
    def run(ms: float, tag: str, tenant: str = "t0") -> None:
        start = time.time()
        if ms:
            time.sleep(ms / 1000.0)
        record(tag, start)


def _define_gated_dag(app: Celery, decorator: Any, record: Any) -> None:
    # A node of scenario 10's workflow: its requirements' results come first (one value, or
    # a list of them for several requirements).
    @decorator("limited")
    @app.task(name="bench.gated_dag", shared=False)
    def run(*inputs: Any, ms: float, tag: str, node: str) -> str:
        start = time.time()
        if ms:
            time.sleep(ms / 1000.0)
        record(tag, start, f" {node}")
        return node


def app_from_env(env: Mapping[str, str]) -> Celery:
    """The app a subprocess worker loads, from ``BENCH_*`` variables."""
    return create_app(
        broker_url=env["BENCH_BROKER"],
        slots_url=env["BENCH_SLOTS"],
        probe_url=env["BENCH_PROBE"],
        prefix=env["BENCH_PREFIX"],
        limit=int(env["BENCH_LIMIT"]),
        gated=env.get("BENCH_GATED", "1") == "1",
        free_limit=int(env.get("BENCH_FREE_LIMIT", "2000")),
        lease_s=float(env.get("BENCH_LEASE", "30")),
        result_backend=env.get("BENCH_RESULTS") or None,
        prefetch=int(env.get("BENCH_PREFETCH", "0")),
    )


app = app_from_env(os.environ) if "BENCH_BROKER" in os.environ else Celery("bench-unconfigured")
