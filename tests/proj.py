"""The test project: a Celery app with gated tasks that measure their own concurrency.

In-process tests call :func:`create_app` (subprocess workers use ``tests/faultproj.py``).
Each task counts itself in a probe Redis (its own database, so the slot keys can be counted
exactly): ``running`` now, ``peak`` ever, ``done`` finished, and one log entry per run.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from celery import Celery

from celery_semaphore import current_fence, gated

# INCR the running counter and raise the peak in one step, so the peak is exact.
_ENTER = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
return n
"""


class Probe:
    """Counters a test reads to see what the tasks saw."""

    def __init__(self, url: str, prefix: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.prefix = prefix
        self._enter = self.client.register_script(_ENTER)

    def key(self, name: str) -> str:
        return f"probe:{self.prefix}:{name}"

    def enter(self, task_id: str) -> None:
        self._enter(keys=[self.key("running"), self.key("peak")])
        self.client.rpush(self.key("log"), f"start {task_id} {time.time():.6f} {current_fence()}")

    def leave(self, task_id: str) -> None:
        pipe = self.client.pipeline()
        pipe.decr(self.key("running"))
        pipe.incr(self.key("done"))
        pipe.rpush(self.key("log"), f"end {task_id} {time.time():.6f}")
        pipe.execute()

    def value(self, name: str) -> int:
        return int(self.client.get(self.key(name)) or 0)


def base_app(
    name: str, *, broker: str, backend: str, slots_url: str, prefix: str, queue: str, limit: int,
    **conf: Any,
) -> Celery:  # fmt: skip
    """A test app: slots under ``prefix``, semaphore ``work`` of size ``limit``, queue ``queue``."""
    app = Celery(name, broker=broker, backend=backend)
    settings: dict[str, Any] = {
        "semaphore_redis_url": slots_url,
        "semaphore_key_prefix": prefix,
        "semaphore_limits": {"work": limit},
        "task_default_queue": queue,
        "broker_connection_retry_on_startup": True,
        "result_expires": 600,
        "worker_hijack_root_logger": False,
        # Ended calls leave no history behind here, so every test can compare the keys at
        # rest; test_workflow covers the history with a short semaphore_history_ttl.
        "semaphore_history_ttl": 0,
    }
    app.conf.update(settings, **conf)
    return app


def create_app(
    name: str,
    *,
    broker: str,
    backend: str,
    slots_url: str,
    probe_url: str,
    prefix: str,
    queue: str,
    limit: int = 3,
    **conf: Any,
) -> Celery:
    """Build an app whose gated tasks share the semaphore ``work`` of size ``limit``."""
    app = base_app(
        name, broker=broker, backend=backend, slots_url=slots_url, prefix=prefix, queue=queue,
        limit=limit, **conf,
    )  # fmt: skip
    probe = Probe(probe_url, prefix)
    app.probe = probe  # type: ignore[attr-defined]

    # Above @app.task.
    @gated("work")
    @app.task(name="proj.work", bind=True, shared=False)
    def work(self: Any, ms: float = 20) -> float:
        probe.enter(self.request.id)
        try:
            time.sleep(ms / 1000.0)
        finally:
            probe.leave(self.request.id)
        return ms

    # Below @app.task, on the function.
    @app.task(name="proj.work_below", bind=True, shared=False)
    @gated("work")
    def work_below(self: Any, ms: float = 20) -> float:
        return work.run(ms)

    @gated("work")
    @app.task(name="proj.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @gated("work")
    @app.task(name="proj.tsum", shared=False)
    def tsum(values: list[int]) -> int:
        return sum(values)

    @gated("work")
    @app.task(name="proj.fail", shared=False)
    def fail() -> None:
        raise RuntimeError("boom")

    @app.task(name="proj.plain", bind=True, shared=False)
    def plain(self: Any, ms: float = 20) -> float:
        time.sleep(ms / 1000.0)
        return ms

    return app
