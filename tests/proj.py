"""The test project: a Celery app with gated tasks that measure their own concurrency.

In-process tests call :func:`create_app`; subprocess workers and beat load the module-level
``app``, configured from ``CS_*`` environment variables (see :func:`app_from_env`).
Each task counts itself in a probe Redis (its own database, so the slot keys can be counted
exactly): ``running`` now, ``peak`` ever, ``done`` finished, and one log entry per run.
"""

from __future__ import annotations

import os
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
    app = Celery(name, broker=broker, backend=backend)
    settings: dict[str, Any] = {
        "semaphore_redis_url": slots_url,
        "semaphore_key_prefix": prefix,
        "semaphore_limits": {"work": limit},
        "task_default_queue": queue,
        "broker_connection_retry_on_startup": True,
        "result_expires": 600,
        "worker_hijack_root_logger": False,
    }
    app.conf.update(settings, **conf)
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


def app_from_env(env: os._Environ[str] | dict[str, str]) -> Celery:
    """The app a subprocess worker or beat loads, from ``CS_*`` variables."""
    extra: dict[str, Any] = {
        "semaphore_tick_interval": float(env.get("CS_TICK", "0.5")),
        "semaphore_lease": float(env.get("CS_LEASE", "30")),
    }
    return create_app(
        "proj",
        broker=env["CS_BROKER"],
        backend=env["CS_BACKEND"],
        slots_url=env["CS_SLOTS"],
        probe_url=env["CS_PROBE"],
        prefix=env["CS_PREFIX"],
        queue=env["CS_QUEUE"],
        limit=int(env.get("CS_LIMIT", "3")),
        **extra,
    )


app = app_from_env(os.environ) if "CS_BROKER" in os.environ else Celery("proj-unconfigured")
