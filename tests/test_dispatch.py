"""Gated calls end to end with a real in-process threads worker and a private redis-server."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
from celery import Celery, chain, chord, group
from kombu.exceptions import EncodeError

from celery_semaphore import TICK_TASK, RedisUnavailable, runtime_for
from celery_semaphore.group import Acquired
from celery_semaphore.message import Envelope
from celery_semaphore.tick import run_tick

from .conftest import acquire, at_rest, slot_keys, threads_worker, wait_for


def test_a_hundred_calls_through_a_gate_of_three_never_run_more_than_three_at_once(
    make_app: Callable[..., Celery], slots: redis.Redis, prefix: str
) -> None:
    app = make_app(limit=3)
    with threads_worker(app, concurrency=8):
        results = [app.tasks["proj.work"].delay(20) for _ in range(100)]
        assert [r.get(timeout=60) for r in results] == [20] * 100
    assert app.probe.value("peak") == 3
    assert app.probe.value("done") == 100
    gate = runtime_for(app).group("work")
    assert gate.held() == 0
    assert gate.parked() == 0
    # Per-call data is gone: only the gate's state hash remains.
    assert slot_keys(slots, prefix) == at_rest(prefix, "work")


def test_the_decorator_works_above_and_below_app_task(make_app: Callable[..., Celery]) -> None:
    app = make_app(limit=2)
    with threads_worker(app, concurrency=6):
        above = [app.tasks["proj.work"].delay(30) for _ in range(10)]
        below = [app.tasks["proj.work_below"].delay(30) for _ in range(10)]
        assert [r.get(timeout=30) for r in above + below] == [30] * 20
    # Both share the semaphore "work": together they never exceeded its 2 slots.
    assert app.probe.value("peak") == 2


def test_a_gated_task_sent_by_a_process_that_does_not_gate_it_still_waits_for_its_gate(
    make_app: Callable[..., Celery], urls: dict[str, str], prefix: str
) -> None:
    # send_task by name from an app without the task (another codebase, a script): the
    # message carries no gate, so the worker sends it through its gate before it runs.
    app = make_app(limit=2)
    stranger = Celery("stranger", broker=urls["broker"], backend=urls["backend"])
    stranger.conf.task_default_queue = prefix
    results = [stranger.send_task("proj.work", args=(40,)) for _ in range(8)]
    with threads_worker(app, concurrency=8):
        assert [r.get(timeout=30) for r in results] == [40] * 8
    assert app.probe.value("peak") == 2
    gate = runtime_for(app).group("work")
    wait_for(lambda: gate.held() == 0 and gate.parked() == 0, 10, "the gate to be at rest")


def test_a_call_with_a_free_slot_is_published_at_once_and_a_full_gate_parks(
    make_app: Callable[..., Celery],
) -> None:
    app = make_app(limit=1)
    gate = runtime_for(app).group("work")
    first = app.tasks["proj.work"].delay(10)
    assert gate.held() == 1 and gate.parked() == 0
    assert app.connection_for_write().default_channel.client.llen(app.conf.task_default_queue) == 1
    second = app.tasks["proj.work"].delay(10)
    assert gate.parked() == 1
    # Only the first message reached the broker.
    assert app.connection_for_write().default_channel.client.llen(app.conf.task_default_queue) == 1
    with threads_worker(app, concurrency=4):
        # No beat runs here: the parked call is handed the slot when the first one ends.
        assert first.get(timeout=20) == 10
        assert second.get(timeout=20) == 10
    assert second.id in {first.id, second.id}


def test_the_result_carries_the_id_the_task_finally_runs_under(
    make_app: Callable[..., Celery],
) -> None:
    app = make_app(limit=1)
    with threads_worker(app, concurrency=2):
        results = [
            app.tasks["proj.work"].apply_async((10,), task_id=f"fixed-{i}") for i in range(4)
        ]
        assert [r.get(timeout=20) for r in results] == [10] * 4
    ran = [
        line.split()[1]
        for line in app.probe.client.lrange(app.probe.key("log"), 0, -1)
        if line.startswith(b"start")
    ]
    assert sorted(x.decode() for x in ran) == [f"fixed-{i}" for i in range(4)]


def test_chains_groups_and_chords_of_gated_tasks_complete_with_their_results(
    make_app: Callable[..., Celery],
) -> None:
    app = make_app(limit=2)
    add, tsum = app.tasks["proj.add"], app.tasks["proj.tsum"]
    with threads_worker(app, concurrency=6):
        assert chain(add.s(1, 2), add.s(3), add.s(4)).apply_async().get(timeout=30) == 10
        assert group(add.s(i, i) for i in range(6)).apply_async().get(timeout=30) == [
            0,
            2,
            4,
            6,
            8,
            10,
        ]
        assert chord((add.s(i, 1) for i in range(5)), tsum.s()).apply_async().get(timeout=30) == 15
    gate = runtime_for(app).group("work")
    assert gate.held() == 0 and gate.parked() == 0


def test_a_failing_task_gives_its_slot_back(make_app: Callable[..., Celery]) -> None:
    app = make_app(limit=1)
    with threads_worker(app, concurrency=2):
        failed = app.tasks["proj.fail"].delay()
        after = app.tasks["proj.work"].delay(5)
        with pytest.raises(RuntimeError, match="boom"):
            failed.get(timeout=20)
        assert after.get(timeout=20) == 5
    assert runtime_for(app).group("work").held() == 0


def test_send_task_by_name_is_gated_too(make_app: Callable[..., Celery]) -> None:
    app = make_app(limit=1)
    gate = runtime_for(app).group("work")
    app.send_task("proj.work", (5,))
    app.send_task("proj.work", (5,))
    assert (gate.held(), gate.parked()) == (1, 1)


def test_arguments_the_serializer_cannot_encode_reach_the_caller_and_park_nothing(
    make_app: Callable[..., Celery], slots: redis.Redis, prefix: str
) -> None:
    app = make_app(limit=1)
    work = app.tasks["proj.work"]
    work.delay(1)  # fills the gate, so a second call would be parked
    before = slot_keys(slots, prefix)
    with pytest.raises(EncodeError):
        work.delay(object())
    gate = runtime_for(app).group("work")
    assert (gate.held(), gate.parked()) == (1, 0)
    assert slot_keys(slots, prefix) == before


def test_an_unreachable_redis_fails_the_call_with_an_error_naming_the_url(
    make_app: Callable[..., Celery],
) -> None:
    app = make_app(
        limit=1, semaphore_redis_url="redis://127.0.0.1:1/0", semaphore_redis_timeout=0.3
    )
    queue = app.conf.task_default_queue
    with pytest.raises(RedisUnavailable, match=r"127\.0\.0\.1:1"):
        app.tasks["proj.work"].delay(1)
    # Nothing reached the broker either.
    assert app.connection_for_write().default_channel.client.llen(queue) == 0


def test_the_tick_reclaims_a_dead_holder_and_dispatches_the_parked_call(
    make_app: Callable[..., Celery],
) -> None:
    app = make_app(limit=1)
    ext = runtime_for(app)
    gate = ext.group("work")
    # A holder whose worker died: granted with a short lease, never released.
    assert acquire(gate, "dead", b"", lease_s=0.05)[0] is Acquired.GRANTED
    parked = app.tasks["proj.work"].delay(5)
    assert gate.parked() == 1
    with threads_worker(app, concurrency=2):
        wait_for(lambda: gate.client.time()[0] * 1000 > min(gate.holders().values()), 5, "expiry")
        app.tasks[TICK_TASK].delay().get(timeout=20)
        assert parked.get(timeout=20) == 5
    assert gate.held() == 0


def test_the_tick_is_in_the_beat_schedule_at_the_configured_interval(
    make_app: Callable[..., Celery],
) -> None:
    app = make_app(semaphore_tick_interval=2.5)
    entry = app.conf.beat_schedule[TICK_TASK]
    assert entry["task"] == TICK_TASK
    assert entry["schedule"] == 2.5


def test_eager_mode_runs_gated_tasks_directly(
    make_app: Callable[..., Celery], slots, prefix
) -> None:
    app = make_app(limit=1, task_always_eager=True)
    assert app.tasks["proj.work"].delay(1).get() == 1
    assert app.tasks["proj.work"].delay(1).get() == 1
    assert slot_keys(slots, prefix) == []


def test_a_parked_call_keeps_its_routing_and_options(make_app: Callable[..., Celery]) -> None:
    app = make_app(limit=1)
    ext = runtime_for(app)
    app.tasks["proj.work"].delay(1)
    app.tasks["proj.work"].apply_async((2,), priority=3, headers={"x-tenant": "acme"})
    raw = ext.client.hvals(ext.group("work").keys["messages"])[0]
    envelope = Envelope.decode(raw)
    if ext.broker_push:
        # Kept as kombu's own message for the queue's priority list (see push.py).
        assert raw.startswith(f"kombu\x1f{app.conf.task_default_queue}\x06\x163\x1f".encode())
        assert envelope.publish_kwargs["routing_key"] == app.conf.task_default_queue
    else:
        assert envelope.queues == [app.conf.task_default_queue]
    assert envelope.publish_kwargs["headers"]["x-tenant"] == "acme"
    assert envelope.publish_kwargs["headers"]["semaphore_gate"] == "work"
    assert envelope.publish_kwargs["priority"] == 3


def test_a_cancelled_parked_call_never_runs_and_its_result_says_revoked(
    make_app: Callable[..., Celery],
) -> None:
    from celery_semaphore import cancel

    app = make_app(limit=1)
    work = app.tasks["proj.work"]
    first = work.delay(50)
    parked = work.delay(1)
    assert cancel(parked) == "parked"
    assert cancel(parked) == ""  # no longer known: it will never run
    # Granted and already in the broker: its copy is refused when a worker receives it.
    assert cancel(first) == "granted"
    third = work.delay(2)  # the cancelled call's room went to the next call
    with threads_worker(app, concurrency=2):
        assert third.get(timeout=20) == 2
        assert (first.state, parked.state) == ("REVOKED", "REVOKED")
    assert app.probe.value("done") == 1
    assert runtime_for(app).group("work").held() == 0


def test_a_call_lost_with_its_worker_under_early_ack_is_recorded_as_dropped(
    make_app: Callable[..., Celery],
) -> None:
    from celery_semaphore import CallDropped

    app = make_app(limit=2, semaphore_dropped_after=0.2)
    ext = runtime_for(app)
    gate = ext.group("work")
    # Started by a worker that then died: early ack, so the broker will not bring it back.
    acquire(gate, "lost-call", b"", limit=2, lease_s=0.05)
    gate.start("lost-call", "deadhost:1")
    # The same with acks_late: the broker redelivers it, so no final state is forced.
    acquire(gate, "coming-back", b"", limit=2, lease_s=0.05)
    gate.start("coming-back", "deadhost:2", redeliver=True)
    wait_for(lambda: gate.client.time()[0] * 1000 > max(gate.holders().values()), 5, "expiry")
    assert run_tick(ext)["work"]["timed_out"] == 2
    # Not at once: a stalled worker may still finish it; after the grace it is recorded.
    assert app.AsyncResult("lost-call").state == "PENDING"
    lost = app.AsyncResult("lost-call")
    wait_for(lambda: run_tick(ext) is not None and lost.state == "FAILURE", 10, "the drop record")
    assert lost.state == "FAILURE"
    assert isinstance(lost.result, CallDropped)
    assert "deadhost:1" in str(lost.result)
    assert app.AsyncResult("coming-back").state == "PENDING"


def test_a_lost_child_of_a_task_a_slot_started_gives_the_slot_back_by_its_header(
    make_app: Callable[..., Celery],
) -> None:
    from celery.app.task import Context

    from celery_semaphore import signals

    app = make_app(limit=1)
    gate = runtime_for(app).group("work")
    acquire(gate, "polled-1", b"")
    gate.start("polled-1", "host:1")
    plain = app.tasks["proj.plain"]  # not @gated: its gate is known only from the header
    # What Celery's main process does when it reports WorkerLostError.
    plain.request_stack.push(Context(id="polled-1", headers={signals.HEADER: "work"}))
    try:
        signals.on_failure(sender=plain, task_id="polled-1")
    finally:
        plain.request_stack.pop()
    assert gate.held() == 0
