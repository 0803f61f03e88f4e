"""``Semaphore``: a gate held by any code, sharing its units with the gated tasks.

Real redis-server; plain subprocesses (``tests/lockproj.py``) and a threads worker.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import Celery

from celery_semaphore import AcquireTimeout, Hold, Semaphore, runtime_for
from celery_semaphore import semaphore as semaphore_module
from celery_semaphore.group import Group
from celery_semaphore.tick import run_tick

from .conftest import ROOT, slot_keys, threads_worker, wait_for
from .faultkit import Cluster, cluster_fixture, peak_overlap  # noqa: F401


def lock_process(cluster: Cluster, *args: str) -> subprocess.Popen[bytes]:
    """Start ``python -m tests.lockproj ARGS``; the cluster kills it at the end of the test."""
    log = open(cluster.tmp / f"lock-{len(cluster.procs)}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.lockproj", *args],
        cwd=ROOT,
        env=cluster.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    cluster.procs.append(proc)
    return proc


def redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def assert_at_rest(slots: redis.Redis, prefix: str, group: Group) -> None:
    """Only the state hash is left, and the ended set if it has a TTL (the gate is in
    semaphore_limits, so no registry entry is needed for beat to find it)."""
    wait_for(lambda: group.held() == 0 and group.parked() == 0, 10, "the gate to be free")
    state, ended = f"{{{prefix}:work}}:state", f"{{{prefix}:work}}:ended"
    keys = slot_keys(slots, prefix)
    assert set(keys) - {ended} == {state}
    if ended in keys:
        assert slots.pttl(ended) > 0


@pytest.mark.slow
def test_two_plain_processes_and_a_gated_task_never_overlap_on_a_semaphore_of_one(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    app = cluster.app
    sleep = app.tasks["fault.sleep"]
    with threads_worker(app, concurrency=4):
        procs = [
            lock_process(cluster, "with", "6", "40"),
            lock_process(cluster, "decorated", "6", "40"),
        ]
        # Send the tasks once both processes compete, so the three really share the gate.
        wait_for(
            lambda: {e["pid"] for e in cluster.probe.events("start")} >= {p.pid for p in procs},
            30,
            "both processes to hold the semaphore once",
        )
        results = [sleep.delay(40) for _ in range(6)]
        assert [r.get(timeout=30) for r in results] == [40] * 6
        for proc in procs:
            assert proc.wait(30) == 0
        assert_at_rest(slots, prefix, cluster.gate)
    runs = cluster.runs()
    locks = [r for r in runs if r.task_id.startswith("lock-")]
    tasks = [r for r in runs if not r.task_id.startswith("lock-")]
    # Every holder ran, each exactly as often as it asked, none cut short.
    assert sorted(r.task_id for r in tasks) == sorted(r.id for r in results)
    assert sorted(r.task_id for r in locks) == sorted(
        f"lock-{p.pid}-{n}" for p in procs for n in range(6)
    )
    assert not any(r.killed for r in runs)
    assert peak_overlap(runs) == 1
    # They took turns: a task ran while the processes still had holds to come.
    assert min(r.start for r in tasks) < max(r.end for r in locks)
    # The holds of the "with" process got their fences, fences grow with the runs.
    fenced = [r for r in runs if r.fence]
    assert [r.fence for r in fenced] == sorted(r.fence for r in fenced)
    assert len({r.fence for r in fenced}) == len(fenced)


def test_acquire_with_a_timeout_or_without_blocking_leaves_nothing_parked(
    make_app: Callable[..., Celery], slots: redis.Redis, prefix: str
) -> None:
    app = make_app(limit=1)
    sem = Semaphore("work", app=app)
    group = runtime_for(app).group("work")
    held = sem.acquire()
    assert isinstance(held, Hold) and held
    assert (sem.held(), group.parked()) == (1, 0)
    began = time.monotonic()
    with pytest.raises(AcquireTimeout) as info:
        sem.acquire(timeout=0.5)
    assert time.monotonic() - began >= 0.5
    assert (info.value.gate, info.value.timeout_s) == ("work", 0.5)
    assert "'work'" in str(info.value)
    assert sem.acquire(blocking=False) is None
    # Neither left anything: one call known, the holder.
    assert (group.parked(), group.waiting(), group.held()) == (0, 0, 1)
    assert list(group.holders()) == [held.id]
    assert slots.hlen(f"{{{prefix}:work}}:calls") == 1
    assert held.release() is True
    assert held.release() is False
    assert not held
    free = sem.acquire(blocking=False)
    assert free
    free.release()
    assert_at_rest(slots, prefix, group)


def test_a_blocked_acquire_is_woken_by_the_release_not_by_polling(
    make_app: Callable[..., Celery],
    slots: redis.Redis,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The fallback poll of a waiting hold comes far too late to explain a prompt wake-up.
    monkeypatch.setattr(semaphore_module, "_POLL_S", 30.0)
    app = make_app(limit=1)
    sem = Semaphore("work", app=app)
    group = runtime_for(app).group("work")
    got: dict[str, Any] = {}

    def waiter() -> None:
        hold = sem.acquire(timeout=10)
        got["at"] = time.monotonic()
        got["hold"] = hold

    first = sem.acquire()
    assert first is not None
    thread = threading.Thread(target=waiter)
    thread.start()
    # It waits in the gate's line, like a parked call.
    wait_for(lambda: group.parked() == 1, 5, "the second acquire to park")
    released_at = time.monotonic()
    first.release()
    thread.join(10)
    assert got["at"] - released_at < 0.3
    second = got["hold"]
    assert isinstance(second, Hold) and second.fence > first.fence
    assert (group.held(), group.parked()) == (1, 0)
    second.release()
    assert_at_rest(slots, prefix, group)


def test_a_blocked_acquire_waits_in_the_gates_line_by_priority(
    make_app: Callable[..., Celery], slots: redis.Redis, prefix: str
) -> None:
    app = make_app(limit=1)
    group = runtime_for(app).group("work")
    first = Semaphore("work", app=app).acquire()
    assert first is not None
    call = app.tasks["proj.work"].delay(1)  # parked first, at priority 0
    urgent = Semaphore("work", app=app, priority=9)
    got: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: got.update(hold=urgent.acquire(timeout=10)))
    thread.start()
    wait_for(lambda: group.parked() == 2, 5, "the urgent acquire to park")
    first.release()
    thread.join(10)
    assert got["hold"]
    # The hold of priority 9 went ahead of the task call that waited longer.
    assert (group.record(call.id) or {}).get("state") == "parked"
    got["hold"].release()
    assert group.record(call.id)["state"] == "granted"
    assert group.parked() == 0


def test_the_decorator_form_serialises_threads_and_releases_on_exception(
    make_app: Callable[..., Celery], slots: redis.Redis, prefix: str
) -> None:
    app = make_app(limit=1)
    sem = Semaphore("work", app=app)
    group = runtime_for(app).group("work")
    spans: list[tuple[float, float]] = []

    @sem
    def critical(n: int) -> int:
        start = time.monotonic()
        time.sleep(0.02)
        spans.append((start, time.monotonic()))
        return n * 2

    @sem
    def broken() -> None:
        raise KeyError("inside")

    assert critical.__name__ == "critical"
    outputs: list[int] = []
    threads = [
        threading.Thread(target=lambda: outputs.extend(critical(n) for n in range(3)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outputs) == sorted([0, 2, 4] * 4)
    spans.sort()
    assert len(spans) == 12
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))
    with pytest.raises(KeyError):
        broken()
    assert_at_rest(slots, prefix, group)


def test_a_hold_keeps_its_lease_alive_while_held(
    make_app: Callable[..., Celery], slots: redis.Redis, prefix: str
) -> None:
    app = make_app(limit=1, semaphore_lease=1.0)
    rt = runtime_for(app)
    sem = Semaphore("work", app=app)
    group = rt.group("work")
    hold = sem.acquire()
    assert hold is not None
    until = redis_ms(slots) + 3000  # three leases, with the tick reclaiming what expired
    wait_for(lambda: run_tick(rt) is not None and redis_ms(slots) >= until, 10, "three leases")
    assert hold
    assert group.holders()[hold.id] > until
    assert sem.acquire(blocking=False) is None
    assert hold.release() is True
    assert_at_rest(slots, prefix, group)


@pytest.mark.slow
def test_a_process_killed_holding_the_semaphore_loses_it_within_lease_plus_tick(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    lease, tick = cluster.lease, cluster.tick  # 1.5 s and 0.5 s
    rt = runtime_for(cluster.app)
    proc = lock_process(cluster, "hold")
    wait_for(lambda: cluster.started(f"lock-{proc.pid}-0"), 30, "the process to hold it")
    sem = Semaphore("work", app=cluster.app)
    assert sem.acquire(blocking=False) is None
    stop = threading.Event()

    def beat() -> None:  # the tick, as beat runs it
        while not stop.wait(tick):
            run_tick(rt)

    ticker = threading.Thread(target=beat, daemon=True)
    ticker.start()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(10)
        hold = sem.acquire(timeout=10)
        elapsed = time.monotonic() - killed_at
    finally:
        stop.set()
        ticker.join(10)
    assert hold
    # Its lease was renewed every lease/3 until the kill, so it lasted at least 2/3 of it.
    assert lease * 2 / 3 - 0.1 <= elapsed <= lease + tick + 0.3
    hold.release()
    assert_at_rest(slots, prefix, cluster.gate)


def test_acquire_with_a_negative_timeout_is_refused_and_stores_nothing(
    make_app: Callable[..., Celery], slots: redis.Redis, prefix: str
) -> None:
    app = make_app(limit=1)
    sem = Semaphore("work", app=app)
    with pytest.raises(ValueError) as info:
        sem.acquire(timeout=-1)
    assert "'work'" in str(info.value)
    assert "timeout" in str(info.value)
    assert slot_keys(slots, prefix) == []


def test_the_tick_reclaims_a_dead_hold_of_a_gate_that_only_a_semaphore_names(
    make_app: Callable[..., Celery],
) -> None:
    app = make_app(limit=1, semaphore_lease=1.0)
    sem = Semaphore("solo", app=app, limit=1)  # no task and no setting names this gate
    hold = sem.acquire()
    assert hold is not None and sem.held() == 1
    hold._stop.set()  # its process "dies": no renewal, no release
    rt = runtime_for(app)
    assert "solo" in rt.known_groups()  # found through the registry, as beat would
    assert rt.client.smembers(rt.registry_key) == {b"solo"}  # "work" is configured: not listed
    wait_for(lambda: run_tick(rt) is not None and sem.held() == 0, 10, "the dead hold's unit")
    assert sem.acquire(blocking=False) is not None
