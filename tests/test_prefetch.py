"""Prefetch: calls waiting in a full gate go to the broker ahead of their grant.

Real parts: a private redis-server holding broker and gates (broker push), in-process
threads workers that hold the calls sent ahead until a release wakes them.
"""

from __future__ import annotations

import logging
import time

import pytest
import redis
from celery import states

from celery_semaphore import Semaphore, cancel, explain, runtime_for
from celery_semaphore.group import Started

from .conftest import push_app, queued_messages, threads_worker, wait_for


def _holding(client: redis.Redis) -> int:
    """How many clients wait on a wake list: calls a worker holds ahead of their grant."""
    return sum(1 for c in client.client_list() if c.get("cmd") == "blpop")


def _start_order(app: object) -> list[str]:
    log = app.probe.client.lrange(app.probe.key("log"), 0, -1)  # type: ignore[attr-defined]
    return [line.split()[1] for line in (x.decode() for x in log) if line.startswith("start")]


def test_calls_sent_ahead_run_in_their_order_each_once_and_never_over_the_limit(
    urls: dict[str, str], prefix: str, slots: redis.Redis, lpushes: list[tuple[str, str]]
) -> None:
    app = push_app(urls, prefix, "slots", limit=1, semaphore_prefetch=2)
    work = app.tasks["proj.work"]
    calls = [work.delay(30) for _ in range(6)]
    gate = runtime_for(app).group("work")
    assert (gate.held(), gate.parked()) == (1, 5)
    # The first (granted) and the next two of the queue (ahead of their grant) are in the
    # broker already; the two ahead are marked as handed on, as their message lives in Redis.
    queued = queued_messages(slots, prefix)
    assert [m["headers"]["id"] for m in reversed(queued)] == [c.id for c in calls[:3]]
    assert [m["headers"]["semaphore_handoff"] for m in reversed(queued)] == ["0", "1", "1"]
    with threads_worker(app, concurrency=6):
        assert [r.get(timeout=30) for r in calls] == [30] * 6
    assert app.probe.value("peak") == 1
    assert _start_order(app) == [c.id for c in calls]
    # Each message reached the broker once, from a script: ahead of its grant or at it.
    wait_for(lambda: len(lpushes) >= 6, 5, "MONITOR to see every push")
    assert [client for client, _ in lpushes] == ["lua"] * 6
    wait_for(lambda: gate.held() == 0 and gate.parked() == 0, 10, "the gate to be at rest")


def test_a_held_call_that_is_cancelled_never_runs(urls: dict[str, str], prefix: str) -> None:
    app = push_app(urls, prefix, "slots", limit=1, semaphore_prefetch=1)
    work = app.tasks["proj.work"]
    with threads_worker(app, concurrency=4):
        first, held = work.delay(600), work.delay(10)
        wait_for(lambda: _holding(app.connection_for_write().default_channel.client), 10, "hold")
        assert cancel(held) == "parked"
        assert first.get(timeout=20) == 600
        # The holder looks again within a second and lets the cancelled call go.
        wait_for(lambda: not _holding(app.connection_for_write().default_channel.client), 5, "go")
    assert held.state == states.REVOKED
    assert _start_order(app) == [first.id]


def test_calls_sent_ahead_and_purged_never_run_wherever_their_copy_is(
    urls: dict[str, str], prefix: str, slots: redis.Redis
) -> None:
    # One purged call is held by a pool thread, the other's copy waits in the worker for a
    # thread: neither may be sent through the gate again when its copy comes back to Redis.
    app = push_app(urls, prefix, "slots", limit=1, semaphore_prefetch=2)
    work = app.tasks["proj.work"]
    with threads_worker(app, concurrency=2):  # one thread runs first, one holds a call
        first = work.delay(800)
        purged = [work.delay(10), work.delay(10)]
        client = app.connection_for_write().default_channel.client
        wait_for(lambda: _holding(client), 10, "a call to be held")
        assert Semaphore("work", app=app).purge() == 2
        assert first.get(timeout=20) == 800
        wait_for(lambda: not _holding(client), 10, "the held call to be let go")
        last = work.delay(10)
        assert last.get(timeout=20) == 10
    assert [r.state for r in purged] == [states.REVOKED] * 2
    assert _start_order(app) == [first.id, last.id]


def test_a_token_for_a_holder_that_died_never_wakes_the_next_holder_of_the_call(
    urls: dict[str, str], prefix: str, slots: redis.Redis
) -> None:
    # The scripts driven directly, the clock too. Found by the chaos soak with prefetch on: a
    # token left for a dead holder woke the call's next holder, which then ran it ungranted.
    app = push_app(urls, prefix, "slots", limit=1, semaphore_prefetch=1)
    work = app.tasks["proj.work"]
    gate = runtime_for(app).group("work")
    first = work.apply_async((10,), queue=f"{prefix}.elsewhere")  # takes the unit
    held = work.delay(10)  # parked, sent ahead
    wake = gate.wake_key(held.id)
    assert gate.start(held.id, "h1:1", mode="c")[0] is Started.AHEAD
    assert gate.release(first.id).released  # grants it to its holder h1 and wakes it
    assert slots.lrange(wake, 0, -1) == [b"2,0"]  # its fence (first had 1), no result wanted
    # h1 died without reading it: its lease runs out, and the call waits to be sent anew.
    later = int(time.time() * 1000) + 600_000
    gate.reclaim(now_ms=later)
    assert not slots.exists(wake)
    assert gate.start(held.id, "h2:2", mode="c", now_ms=later + 60_000)[0] is Started.RUN


def test_a_second_copy_of_a_held_call_is_skipped_so_one_holder_waits_for_the_token(
    urls: dict[str, str], prefix: str
) -> None:
    # The broker redelivers a held call (acks_late past the visibility timeout): a second
    # holder would race the first for the token and both could run it.
    app = push_app(urls, prefix, "slots", limit=1, semaphore_prefetch=1)
    work = app.tasks["proj.work"]
    gate = runtime_for(app).group("work")
    first = work.apply_async((10,), queue=f"{prefix}.elsewhere")
    held = work.delay(10)
    assert gate.start(held.id, "h1:1", mode="c")[0] is Started.AHEAD
    assert gate.start(held.id, "h2:2", mode="c")[0] is Started.REPARKED  # skipped
    assert gate.start(held.id, "h1:1", mode="c")[0] is Started.AHEAD  # the first looks again
    assert gate.release(first.id).released
    assert gate.start(held.id, "h2:2", mode="c")[0] is Started.DUPLICATE  # h1 runs it


def test_prefetch_without_broker_push_says_it_has_no_effect_and_sends_nothing_ahead(
    urls: dict[str, str], prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = push_app(urls, prefix, "own", limit=1, semaphore_prefetch=2)  # broker elsewhere
    work = app.tasks["proj.work"]
    with caplog.at_level(logging.WARNING):
        first, parked = work.delay(10), work.delay(10)
    assert "semaphore_prefetch = 2 has no effect" in caplog.text
    broker = app.connection_for_write().default_channel.client
    assert [m["headers"]["id"] for m in queued_messages(broker, prefix)] == [first.id]
    with threads_worker(app, concurrency=4):
        assert [r.get(timeout=20) for r in (first, parked)] == [10, 10]


def test_explain_says_where_a_call_sent_ahead_is(urls: dict[str, str], prefix: str) -> None:
    app = push_app(urls, prefix, "slots", limit=1, semaphore_prefetch=1)
    work = app.tasks["proj.work"]
    gate = runtime_for(app).group("work")
    first = work.apply_async((10,), queue=f"{prefix}.elsewhere")
    held = work.delay(10)
    assert explain(held.id, app=app).reason.endswith("sent ahead of its grant, in the broker")
    assert gate.start(held.id, "h1:1", mode="c")[0] is Started.AHEAD
    assert explain(held.id, app=app).reason.endswith("sent ahead of its grant, held by h1:1")
    assert gate.release(first.id).released
    assert explain(held.id, app=app).reason == (
        "runs on h1:1, fence 2 (granted to its holder, which has not confirmed the run yet)"
    )
