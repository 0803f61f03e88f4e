"""Recurring calls: schedules in Redis fired by the tick, through the gates of their task.

Real redis-server; real ``celery beat`` subprocesses (``tests.faultproj``) and a threads
worker that runs the ticks they send and the occurrences.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import Celery

from celery_semaphore import Semaphore, recurring, runtime_for
from celery_semaphore.tick import run_tick

from .conftest import slot_keys, threads_worker, wait_for
from .faultkit import Cluster, cluster_fixture  # noqa: F401


def occurrences(cluster: Cluster, name: str) -> Counter[str]:
    """Finished runs per occurrence (``<name>-<number>``) of schedule ``name``."""
    return Counter(
        e["id"].rsplit("-", 1)[0]
        for e in cluster.probe.events("end")
        if e["id"].startswith(f"{name}-")
    )


def redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def kill(proc: Any) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.mark.slow
def test_a_schedule_fires_exactly_its_repeats_across_a_restart_of_beat(cluster: Cluster) -> None:
    app = cluster.app
    schedules = recurring(app)
    schedules.add("abc", app.tasks["fault.sleep"].s(20), every=1, repeats=3)
    [listed] = schedules.list()
    assert (listed.name, listed.task, listed.every_s, listed.repeats, listed.overlap) == (
        "abc", "fault.sleep", 1.0, 3, "skip",
    )  # fmt: skip
    assert (listed.fired, listed.skipped) == (0, 0)
    with threads_worker(app, concurrency=4):
        first = cluster.beat("beat1")
        wait_for(lambda: occurrences(cluster, "abc"), 30, "the first occurrence")
        kill(first)
        restarted_at = time.time()
        second = cluster.beat("beat2")
        wait_for(
            lambda: not schedules.list() and sum(occurrences(cluster, "abc").values()) >= 3,
            30,
            "the last occurrence",
        )
        assert second.poll() is None
    # The schedule is gone with its last occurrence: nothing can fire any more.
    assert occurrences(cluster, "abc") == {"abc-1": 1, "abc-2": 1, "abc-3": 1}
    third = [e for e in cluster.probe.events("start") if e["id"].startswith("abc-3-")]
    assert third[0]["t"] > restarted_at  # fired by the new beat
    assert (cluster.gate.held(), cluster.gate.parked()) == (0, 0)


@pytest.mark.slow
def test_two_beats_at_once_fire_each_occurrence_once(cluster: Cluster) -> None:
    app = cluster.app
    schedules = recurring(app)
    schedules.add("two", app.tasks["fault.sleep"].s(20), every=1, repeats=3)
    with threads_worker(app, concurrency=4):
        beats = [cluster.beat("beat-a"), cluster.beat("beat-b")]
        wait_for(
            lambda: not schedules.list() and sum(occurrences(cluster, "two").values()) >= 3,
            30,
            "the last occurrence",
        )
        assert [b.poll() for b in beats] == [None, None]
    for name in ("beat-a", "beat-b"):  # both sent ticks while the schedule ran
        log = (cluster.tmp / f"{name}.log").read_text()
        assert log.count("Sending due task celery_semaphore.tick") >= 2
    assert occurrences(cluster, "two") == {"two-1": 1, "two-2": 1, "two-3": 1}


def test_overlap_skip_counts_a_skip_while_the_last_occurrence_runs_and_remove_stops_it(
    cluster: Cluster,
) -> None:
    app = cluster.app
    rt = runtime_for(app)
    schedules = recurring(app)
    schedules.add("slow", app.tasks["fault.hang"].s("done"), every=1, overlap="skip")

    def due() -> bool:
        [schedule] = schedules.list()
        return redis_ms(rt.client) >= schedule.next_ms

    def tick_when_due() -> dict[str, Any]:
        wait_for(due, 10, "the next occurrence to be due")
        return run_tick(rt)

    with threads_worker(app, concurrency=4):
        assert tick_when_due()["recurring"] == {"fired": 1}
        [schedule] = schedules.list()
        first = schedule.last_id
        cluster.wait_started(first)
        # Due while the first one still runs: skipped, and counted.
        assert "recurring" not in tick_when_due()
        assert "recurring" not in tick_when_due()
        [schedule] = schedules.list()
        assert (schedule.fired, schedule.skipped, schedule.last_id) == (1, 2, first)
        cluster.probe.set_flag("done")
        assert app.AsyncResult(first).get(timeout=20) == "done"
        wait_for(lambda: cluster.gate.record(first) is None, 10, "the first one to end")
        assert tick_when_due()["recurring"] == {"fired": 1}
        [schedule] = schedules.list()
        assert (schedule.fired, schedule.skipped) == (2, 2)
        second = schedule.last_id
        assert second.startswith("slow-4-")
        assert app.AsyncResult(second).get(timeout=20) == "done"
        next_ms = schedule.next_ms
        assert schedules.remove("slow") is True
        assert schedules.remove("slow") is False
        assert schedules.list() == []
        wait_for(lambda: redis_ms(rt.client) >= next_ms, 10, "the removed schedule's time")
        assert "recurring" not in run_tick(rt)
    assert [e["id"] for e in cluster.probe.events("start")] == [first, second]


@pytest.mark.parametrize("overlap", ["queue", "replace"])
def test_overlap_queue_parks_behind_and_replace_cancels_the_waiting_occurrence(
    make_app: Callable[..., Celery], slots: redis.Redis, prefix: str, overlap: str
) -> None:
    app = make_app(limit=1, semaphore_tick_interval=0.5)
    rt = runtime_for(app)
    group = rt.group("work")
    schedules = recurring(app)
    blocker = Semaphore("work", app=app).acquire()  # the occurrences have to wait
    assert blocker is not None
    schedules.add("r", app.tasks["proj.add"].s(1, 2), every=1, repeats=3, overlap=overlap)
    assert run_tick(rt)["recurring"] == {"fired": 1}
    [schedule] = schedules.list()
    first = schedule.last_id
    assert group.record(first)["state"] == "parked"
    wait_for(lambda: redis_ms(slots) >= schedule.next_ms, 10, "the second occurrence")
    assert run_tick(rt)["recurring"] == {"fired": 1}
    [schedule] = schedules.list()
    second = schedule.last_id
    assert (schedule.fired, schedule.skipped) == (2, 0)
    assert schedules.remove("r") is True
    if overlap == "queue":
        assert group.parked() == 2
    else:
        assert group.parked() == 1
        assert app.AsyncResult(first).state == "REVOKED"
        assert group.record(first) is None
    blocker.release()
    with threads_worker(app, concurrency=2):
        assert app.AsyncResult(second).get(timeout=20) == 3
        if overlap == "queue":
            assert app.AsyncResult(first).get(timeout=20) == 3
        wait_for(lambda: group.held() == 0 and group.parked() == 0, 10, "the gate to be free")
    assert app.AsyncResult(first).state == ("SUCCESS" if overlap == "queue" else "REVOKED")
    keys = set(slot_keys(slots, prefix)) - {f"{{{prefix}:work}}:ended"}
    assert keys == {f"{{{prefix}:work}}:state"}


BAD = [
    ({"every": 0.4}, ValueError, "semaphore_tick_interval"),
    ({"every": 0}, ValueError, "every"),
    ({"every": -1}, ValueError, "every"),
    ({"every": 1, "repeats": 0}, ValueError, "repeats"),
    ({"every": 1, "overlap": "x"}, ValueError, "overlap"),
]


@pytest.mark.parametrize(("options", "error", "option"), BAD)
def test_bad_schedules_are_refused_naming_schedule_and_option(
    make_app: Callable[..., Celery],
    slots: redis.Redis,
    prefix: str,
    options: dict[str, Any],
    error: type[Exception],
    option: str,
) -> None:
    app = make_app(limit=1, semaphore_tick_interval=0.5)
    with pytest.raises(error) as info:
        recurring(app).add("abc", app.tasks["proj.work"].s(1), **options)
    assert "'abc'" in str(info.value)
    assert option in str(info.value)
    assert slot_keys(slots, prefix) == []


def test_a_schedule_of_a_task_that_is_not_gated_or_not_registered_is_refused(
    make_app: Callable[..., Celery], slots: redis.Redis, prefix: str
) -> None:
    app = make_app(limit=1, semaphore_tick_interval=0.5)
    schedules = recurring(app)
    with pytest.raises(ValueError, match=r"recurring 'abc'.*'proj\.plain' is not gated"):
        schedules.add("abc", app.tasks["proj.plain"].s(1), every=1)
    with pytest.raises(ValueError, match=r"recurring 'abc'.*'no\.such' is not registered"):
        schedules.add("abc", app.signature("no.such"), every=1)
    with pytest.raises(TypeError, match="recurring 'abc'"):
        schedules.add("abc", "proj.work", every=1)  # type: ignore[arg-type]
    assert slot_keys(slots, prefix) == []


def test_a_taken_name_is_refused_unless_replace(
    make_app: Callable[..., Celery], slots: redis.Redis, prefix: str
) -> None:
    app = make_app(limit=1, semaphore_tick_interval=0.5)
    schedules = recurring(app)
    schedules.add("abc", app.tasks["proj.work"].s(1), every=3, repeats=2)
    stored = {k: slots.dump(k) for k in slot_keys(slots, prefix)}
    with pytest.raises(ValueError, match=r"recurring 'abc'.*taken.*replace=True"):
        schedules.add("abc", app.tasks["proj.work"].s(2), every=5)
    assert {k: slots.dump(k) for k in slot_keys(slots, prefix)} == stored
    schedules.add("abc", app.tasks["proj.work"].s(2), every=5, overlap="queue", replace=True)
    [schedule] = schedules.list()
    assert (schedule.every_s, schedule.repeats, schedule.overlap) == (5.0, None, "queue")
