"""Lost Redis data, unreadable parked entries, and a client clock that is off."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import redis
from celery import Celery

from celery_semaphore import runtime_for
from celery_semaphore.group import Acquired
from celery_semaphore.server import PrivateRedis, start_private_redis
from celery_semaphore.tick import run_tick

from .conftest import acquire, threads_worker, wait_for


@pytest.fixture
def own_slots_redis() -> Iterator[PrivateRedis]:
    """A redis-server for the slots alone, which the test may restart empty."""
    server = start_private_redis()
    try:
        yield server
    finally:
        server.stop()


def test_a_slots_redis_restarted_empty_does_not_over_admit_while_old_holders_run(
    make_app: Callable[..., Celery], own_slots_redis: PrivateRedis
) -> None:
    app = make_app(limit=2, semaphore_redis_url=own_slots_redis.url, semaphore_lease=1.5)
    ext = runtime_for(app)
    work = app.tasks["proj.work"]
    stop_ticking = threading.Event()

    def tick_forever() -> None:
        while not stop_ticking.wait(0.2):
            # The server is down for a moment; the next tick retries.
            with contextlib.suppress(Exception):
                run_tick(ext)

    with threads_worker(app, concurrency=6):
        long_runs = [work.delay(4000) for _ in range(2)]
        wait_for(lambda: app.probe.value("running") == 2, 20, "two long runs")
        own_slots_redis.restart()  # empty: no persistence
        ticker = threading.Thread(target=tick_forever, daemon=True)
        ticker.start()
        try:
            # This client saw the old data set: the loss is detected and nobody is admitted.
            later = [work.delay(10) for _ in range(3)]
            assert ext.group("work").parked() == 3
            assert [r.get(timeout=30) for r in long_runs + later] == [4000, 4000, 10, 10, 10]
        finally:
            stop_ticking.set()
            ticker.join()
    assert app.probe.value("peak") == 2
    gate = ext.group("work")
    assert (gate.held(), gate.parked()) == (0, 0)


def test_the_tick_moves_an_unreadable_parked_entry_aside_and_carries_on(
    make_app: Callable[..., Celery], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(limit=1)
    ext = runtime_for(app)
    gate = ext.group("work")
    assert acquire(gate, "blocker", b"", lease_s=0.05)[0] is Acquired.GRANTED
    # Written by hand or by an older version: a parked call whose record is not JSON, then a
    # good call whose message is junk, then a good call.
    acquire(gate, "junk-record", b"x")
    gate.client.hset(gate.keys["calls"], "junk-record", "{not json")
    acquire(gate, "junk-message", b"\x00not an envelope")
    good = app.tasks["proj.work"].delay(5)
    wait_for(lambda: gate.client.time()[0] * 1000 > min(gate.holders().values()), 5, "expiry")
    with caplog.at_level(logging.ERROR), threads_worker(app, concurrency=2):
        for _ in range(3):
            run_tick(ext)
        assert good.get(timeout=20) == 5
    assert set(gate.aside()) == {"junk-record", "junk-message"}
    assert "junk-record" in caplog.text and "junk-message" in caplog.text
    wait_for(lambda: gate.held() == 0, 10, "the slot to be free")


def test_a_client_clock_an_hour_off_changes_no_lease(
    make_app: Callable[..., Celery], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(limit=2, semaphore_lease=30)
    gate = runtime_for(app).group("work")
    skewed = app.now() + timedelta(hours=1)
    monkeypatch.setattr(app, "now", lambda: skewed)
    work = app.tasks["proj.work"]
    now = work.delay(1)
    later = work.apply_async((1,), countdown=10)
    seconds, micros = gate.client.time()
    server_ms = seconds * 1000 + micros // 1000
    deadlines = gate.holders()
    assert server_ms + 29_000 <= deadlines[now.id] <= server_ms + 30_000
    # The countdown call holds nothing while it waits; it becomes due on the Redis clock.
    assert later.id not in deadlines
    record = gate.record(later.id)
    assert record is not None and record["state"] == "waiting"
    assert server_ms + 9_000 <= record["ready_ms"] <= server_ms + 10_000


def test_calls_made_while_the_slots_redis_is_down_fail_fast_and_write_nothing(
    make_app: Callable[..., Celery], own_slots_redis: PrivateRedis
) -> None:
    from celery_semaphore import RedisUnavailable

    app = make_app(limit=1, semaphore_redis_url=own_slots_redis.url, semaphore_redis_timeout=1)
    work = app.tasks["proj.work"]
    work.delay(1)
    own_slots_redis.stop()
    with pytest.raises(RedisUnavailable, match=own_slots_redis.url.rsplit("/", 1)[0]):
        work.delay(2)
    own_slots_redis.restart()
    client = redis.Redis.from_url(own_slots_redis.url)
    assert client.dbsize() == 0
    assert app.connection_for_write().default_channel.client.llen(app.conf.task_default_queue) == 1
