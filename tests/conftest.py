"""Fixtures: a private redis-server per session, an app per test, real workers.

Tests never flush a Redis they did not start. With ``CELERY_SEMAPHORE_TEST_REDIS_URL`` set,
they use that server instead, and isolate themselves by key prefix and queue name only.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import celery.contrib.testing.tasks  # noqa: F401  registers celery.ping for start_worker
import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_semaphore.server import start_private_redis

from . import proj

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_base() -> Iterator[str]:
    """``redis://host:port`` of the test Redis (without a database number)."""
    external = os.environ.get("CELERY_SEMAPHORE_TEST_REDIS_URL")
    if external:
        yield external.rstrip("/").rsplit("/", 1)[0] if external.count("/") > 2 else external
        return
    server = start_private_redis()
    try:
        yield server.url.rsplit("/", 1)[0]
    finally:
        server.stop()


@pytest.fixture
def gate_shape() -> str:
    """How the fault tasks are gated (tests/faultproj.py): ``"plain"``; a module may
    parametrize it with ``"keyed"`` (work keyed, weighted and stacked with aux)."""
    return "plain"


@pytest.fixture
def prefix() -> str:
    """A key prefix and queue name of this test alone."""
    return f"t{uuid.uuid4().hex[:10]}"


#: Where the tests' broker lives: "shared" (the default, and the common deployment) puts it in
#: the gates' database, so grants push messages themselves (see celery_semaphore/push.py);
#: "split" gives it a database of its own, so every message goes through Celery's publish.
LAYOUT = os.environ.get("CELERY_SEMAPHORE_TEST_LAYOUT", "shared")


@pytest.fixture
def urls(redis_base: str) -> dict[str, str]:
    """Database per role: slots, broker (the slots' one in the shared layout), results, probe
    counters."""
    return {
        "slots": f"{redis_base}/0",
        "broker": f"{redis_base}/{0 if LAYOUT == 'shared' else 1}",
        "backend": f"{redis_base}/2",
        "probe": f"{redis_base}/3",
    }


@pytest.fixture
def slots(urls: dict[str, str]) -> redis.Redis:
    """A client of the slots database."""
    return redis.Redis.from_url(urls["slots"])


def slot_keys(client: redis.Redis, prefix: str) -> list[str]:
    """Every slot key under ``prefix``."""
    return sorted(k.decode() for k in client.scan_iter(match=f"{{{prefix}:*", count=1000))


#: What a semaphore keeps at rest, whatever it ran: its state hash and its free-slot set.
AT_REST = ("state",)


def at_rest(prefix: str, *gates: str) -> list[str]:
    """The keys ``gates`` keep once no call is parked, held or remembered."""
    return sorted(f"{{{prefix}:{gate}}}:{part}" for gate in gates for part in AT_REST)


@pytest.fixture
def make_app(urls: dict[str, str], prefix: str) -> Callable[..., Celery]:
    """Build this test's app (see tests/proj.py)."""

    def make(limit: int = 3, **conf: Any) -> Celery:
        return proj.create_app(
            f"proj-{prefix}",
            broker=urls["broker"],
            backend=urls["backend"],
            slots_url=urls["slots"],
            probe_url=urls["probe"],
            prefix=prefix,
            queue=prefix,
            limit=limit,
            **conf,
        )

    return make


@contextlib.contextmanager
def threads_worker(app: Celery, concurrency: int = 8) -> Iterator[Any]:
    """An in-process worker of the threads pool, ready when the block starts."""
    with start_worker(
        app,
        pool="threads",
        concurrency=concurrency,
        perform_ping_check=True,
        loglevel="WARNING",
        shutdown_timeout=30,
    ) as worker:
        yield worker


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def acquire(
    group: Any,
    task_id: str,
    message: bytes = b"",
    *,
    gate: str = "work",
    limit: int = 1,
    lease_s: float = 30.0,
    now_ms: int | None = None,
    **call: Any,
) -> Any:
    """Acquire ``gate`` for a call made by hand (a holder whose worker is gone, say)."""
    from celery_semaphore.spec import CallSpec

    spec = CallSpec(
        keys=tuple(call.get("keys", ("",))),
        weights=tuple(call.get("weights", (1,))),
        key_limits=tuple(call.get("key_limits", (0,))),
        priority=call.get("priority", 0),
        lease_ms=int(lease_s * 1000),
        redeliver=call.get("redeliver", False),
    )
    gates = tuple(call.get("gates", (gate,)))
    limits = call.get("limits", [limit] * len(gates))
    return group.acquire(
        task_id, spec.to_json(gates), limits, message, lease_ms=spec.lease_ms,
        delay_ms=call.get("delay_ms", 0), flags=call.get("flags", ""), now_ms=now_ms,
    )  # fmt: skip


def push_app(urls: dict[str, str], prefix: str, broker: str, **conf: Any) -> Celery:
    """An app of tests/proj.py for broker push: ``broker`` "slots" is the gates' database,
    "own" a database of its own."""
    base = urls["slots"].rsplit("/", 1)[0]
    return proj.create_app(
        f"push-{prefix}",
        broker=urls["slots"] if broker == "slots" else f"{base}/1",
        backend=urls["backend"],
        slots_url=urls["slots"],
        probe_url=urls["probe"],
        prefix=prefix,
        queue=prefix,
        limit=conf.pop("limit", 1),
        **conf,
    )


@pytest.fixture
def lpushes(slots: redis.Redis, prefix: str) -> Iterator[list[tuple[str, str]]]:
    """(client, key) of every LPUSH of a gated call into this test's queues, as MONITOR sees
    them (the test worker's own ping is not one)."""
    seen: list[tuple[str, str]] = []
    ready = threading.Event()
    monitor = slots.monitor()

    def watch() -> None:
        with monitor as m:
            ready.set()
            try:
                for entry in m.listen():
                    words = entry["command"].split(" ")
                    gated = "proj.work" in entry["command"]
                    if words[0] == "LPUSH" and words[1].startswith(prefix) and gated:
                        seen.append((entry.get("client_type", ""), words[1]))
            except (redis.ConnectionError, ValueError, AttributeError):
                return  # the connection closed at the end of the test

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert ready.wait(5)
    yield seen
    monitor.connection.disconnect()


def queued_messages(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The messages waiting in a kombu queue list, newest first."""
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
