"""The Scheduler model: slots in Redis polling backends, standalone and under Celery."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_semaphore import (
    AbstractBackend,
    ConfigurationError,
    RedisSlot,
    Scheduler,
    gated,
    runtime_for,
)
from celery_semaphore.tick import run_tick
from celery_semaphore.worker import keepalive_interval

from .conftest import ROOT, slot_keys, threads_worker, wait_for

EXAMPLE = ROOT / "examples" / "db_backend"


class Store:
    """Tasks to hand out and a log of every callback, shared by the test and its backends."""

    def __init__(self) -> None:
        self.todo: list[str] = []
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()


class First(AbstractBackend):
    """Hands out the store's tasks; records every callback."""

    def poll(self) -> str | None:
        store: Store = self.context["store"]
        with store.lock:
            return store.todo[0] if store.todo else None

    def start_callback(self, task_id: str) -> None:
        store: Store = self.context["store"]
        with store.lock:
            if task_id in store.todo:
                store.todo.remove(task_id)
            store.events.append(("start", task_id))

    def stop_callback(self, task_id: str) -> None:
        self.context["store"].events.append(("stop", task_id))

    def timeout_callback(self, task_id: str) -> None:
        self.context["store"].events.append(("timeout", task_id))

    def keepalive_callback(self, task_id: str) -> None:
        self.context["store"].events.append(("keepalive", task_id))


class Second(AbstractBackend):
    """Always has one task, "second-N"."""

    count = 0

    def poll(self) -> str | None:
        return f"second-{Second.count}"

    def start_callback(self, task_id: str) -> None:
        Second.count += 1
        self.context["store"].events.append(("start-second", task_id))


class Exploding(AbstractBackend):
    def poll(self) -> str | None:
        raise RuntimeError("database down")

    def start_callback(self, task_id: str) -> None: ...


class FailsToStart(First):
    def start_callback(self, task_id: str) -> None:
        self.context["store"].events.append(("start-failed", task_id))
        raise RuntimeError("cannot launch")


class NoStart(AbstractBackend):
    def poll(self) -> str | None:
        return None


def slot(slot_id: Any, *backends: str, timeout: float = 30, **extra: Any) -> dict[str, Any]:
    return {
        "slot_id": slot_id,
        "backends": list(backends),
        "slot_cls": "RedisSlot",
        "timeout": timeout,
        **extra,
    }


@pytest.fixture
def store() -> Store:
    return Store()


@pytest.fixture
def make_scheduler(slots: redis.Redis, prefix: str, store: Store) -> Callable[..., Scheduler]:
    def make(configs: list[dict[str, Any]]) -> Scheduler:
        return Scheduler({"redis_c": slots, "store": store}, prefix=prefix).load(configs)

    return make


def test_an_idle_slot_starts_a_task_and_stop_frees_it_for_the_next(make_scheduler, store) -> None:
    scheduler = make_scheduler([slot(1, "First")])
    store.todo = ["a", "b"]
    assert scheduler.schedule() == {"slots": {"timed_out": 0, "started": 1}}
    assert scheduler.slots[0].current() == "a"
    assert scheduler.schedule()["slots"]["started"] == 0  # the slot is busy
    assert scheduler.keepalive("a") is True
    assert scheduler.stop("a") is True
    # stop() fills the freed slot at once; schedule() need not run.
    assert scheduler.slots[0].current() == "b"
    assert store.events == [("start", "a"), ("keepalive", "a"), ("stop", "a"), ("start", "b")]


def test_a_timed_out_task_gets_timeout_then_stop_callback(make_scheduler, store) -> None:
    scheduler = make_scheduler([slot(1, "First", timeout=1)])
    store.todo = ["slow"]
    scheduler.schedule()
    gate = scheduler.group_of("slots")
    wait_for(
        lambda: (
            gate.client.time()[0] * 1000 + gate.client.time()[1] // 1000 > gate.holders()["slow"]
        ),
        5,
        "the timeout to pass",
    )
    assert scheduler.schedule()["slots"]["timed_out"] == 1
    assert store.events == [("start", "slow"), ("timeout", "slow"), ("stop", "slow")]
    assert scheduler.slots[0].current() is None
    # A late stop or keepalive of the timed-out task changes nothing.
    assert scheduler.stop("slow") is False
    assert scheduler.keepalive("slow") is False


def test_the_second_backend_is_polled_when_the_first_has_nothing(make_scheduler, store) -> None:
    scheduler = make_scheduler([slot(1, "First", "Second")])
    scheduler.schedule()
    assert [e for e, _ in store.events] == ["start-second"]
    store.todo = ["a"]
    scheduler.stop(scheduler.slots[0].current())
    # First is polled first again once the slot is free.
    assert store.events[-1] == ("start", "a")


def test_a_failing_poll_is_logged_with_its_name_and_the_others_carry_on(
    make_scheduler, store, caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = make_scheduler([slot(1, "Exploding", "First"), slot(2, "First")])
    store.todo = ["a", "b"]
    with caplog.at_level(logging.ERROR):
        assert scheduler.schedule()["slots"]["started"] == 2
    assert "Exploding" in caplog.text and "poll() failed" in caplog.text
    assert sorted(t for _, t in store.events) == ["a", "b"]


def test_a_start_callback_that_raises_leaves_the_slot_free_and_calls_nothing_else(
    make_scheduler, store
) -> None:
    scheduler = make_scheduler([slot(1, "FailsToStart")])
    store.todo = ["a"]
    assert scheduler.schedule()["slots"]["started"] == 0
    assert scheduler.slots[0].current() is None
    assert store.events == [("start-failed", "a")]


def test_two_schedulers_racing_over_the_same_slots_never_double_start(
    slots: redis.Redis, prefix: str
) -> None:
    store = Store()
    store.todo = [f"t{i}" for i in range(40)]
    configs = [slot(n, "First", timeout=30) for n in (1, 2, 3)]
    schedulers = [
        Scheduler({"redis_c": slots, "store": store}, prefix=prefix).load(configs) for _ in range(2)
    ]
    seen_in_slot: list[dict[str, str]] = []
    done = threading.Event()

    def run(scheduler: Scheduler) -> None:
        while not done.is_set():
            scheduler.schedule()
            running = scheduler.group_of("slots").slots("slots")
            seen_in_slot.append(running)
            for task_id in running.values():
                scheduler.stop(task_id)

    threads = [threading.Thread(target=run, args=(s,)) for s in schedulers]
    for t in threads:
        t.start()
    wait_for(lambda: not store.todo, 30, "every task to start")
    done.set()
    for t in threads:
        t.join()
    started = [t for e, t in store.events if e == "start"]
    assert sorted(started) == sorted(f"t{i}" for i in range(40))  # each exactly once
    assert all(len(view) <= 3 for view in seen_in_slot)


@pytest.mark.parametrize(
    ("configs", "message"),
    [
        ([slot(1, "NoSuchBackend")], "unknown backend 'NoSuchBackend'; known names: .*First"),
        (
            [{**slot(1, "First"), "slot_cls": "Nope"}],
            "unknown slot class 'Nope'; known names: .*RedisSlot",
        ),
        ([slot(1, "First"), slot(1, "First")], "duplicate .*slot_id 1"),
        ([{"slot_id": 1, "backends": ["First"]}], "missing 'slot_cls'"),
        ([slot(1, "NoStart")], "NoStart does not override start_callback"),
        ([slot(1, "First", timeout=0)], "timeout must be a finite positive number"),
        ([{**slot(1, "First"), "colour": "red"}], "unknown keys \\['colour'\\]"),
        ([slot(1)], "'backends' must be a non-empty list"),
    ],
)
def test_load_validates_the_whole_configuration_before_anything_runs(
    slots: redis.Redis, prefix: str, configs: list[dict[str, Any]], message: str
) -> None:
    scheduler = Scheduler({"redis_c": slots}, prefix=prefix)
    with pytest.raises(ConfigurationError, match=message):
        scheduler.load([slot("ok", "First"), *configs])
    assert scheduler.slots == []  # nothing of the list was loaded


def test_backends_and_slot_classes_also_load_from_dotted_paths(slots, prefix) -> None:
    scheduler = Scheduler({"redis_c": slots}, prefix=prefix).load(
        [
            {
                "slot_id": 1,
                "backends": ["tests.test_scheduler.First"],
                "slot_cls": "celery_semaphore.slot.RedisSlot",
            }
        ]
    )
    assert isinstance(scheduler.slots[0], RedisSlot)
    assert scheduler.slots[0].timeout_s == 300.0  # the default timeout


def test_the_standalone_example_runs(redis_base: str, tmp_path: Path, prefix: str) -> None:
    env = dict(os.environ, REDIS_URL=f"{redis_base}/6", JOBS_DB=str(tmp_path / "jobs.sqlite"))
    out = subprocess.run(
        [sys.executable, "standalone.py", "--jobs", "6", "--interval", "0.2"],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "peak concurrency: 2 (2 slots)"
    assert "{'done': 6}" in out.stdout


def test_the_celery_example_runs_jobs_on_a_worker_with_beat_filling_three_slots(
    redis_base: str, tmp_path: Path
) -> None:
    db = tmp_path / "jobs.sqlite"
    env = dict(
        os.environ,
        REDIS_URL=f"{redis_base}/7",
        JOBS_DB=str(db),
        PYTHONPATH=f"{EXAMPLE}{os.pathsep}{ROOT}",
    )
    sys.path.insert(0, str(EXAMPLE))
    try:
        import jobs
    finally:
        sys.path.remove(str(EXAMPLE))
    jobs.add_jobs(9, 0.3, str(db))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_app", *args],
            cwd=EXAMPLE,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for args in (
            ["worker", "-c", "6", "-l", "WARNING"],
            ["beat", "-l", "WARNING", "-s", str(tmp_path / "beat")],
        )
    ]
    try:
        wait_for(lambda: jobs.counts(str(db)).get("done") == 9, 60, "the nine jobs")
    finally:
        for proc in procs:
            os.killpg(proc.pid, 9)
            proc.wait(10)
    assert jobs.peak_concurrency(str(db)) == 3
    slots_client = redis.Redis.from_url(f"{redis_base}/7")
    assert slots_client.hlen("{db-example:jobs}:slots") == 0


def test_a_gate_with_slots_serves_gated_calls_and_polled_backends_from_one_limit(
    make_app: Callable[..., Celery], prefix: str, slots: redis.Redis
) -> None:
    """A semaphore of three slots is a gate of limit 3: gated calls and polled slots share it."""
    store = Store()
    app = make_app(
        semaphore_slots=[
            slot("g1", "GatedCalls", "First", semaphore="mixed"),
            slot("p1", "First", "GatedCalls", semaphore="mixed"),
            slot("p2", "First", "GatedCalls", semaphore="mixed"),
        ],
    )

    @gated("mixed", limit=3)
    @app.task(name="proj.mixed", shared=False)
    def mixed(ms: float) -> float:
        time.sleep(ms / 1000)
        return ms

    rt = runtime_for(app)
    rt.scheduler.backend("mixed", "First").context["store"] = store  # type: ignore[union-attr]
    gate = rt.group("mixed")
    results = [mixed.delay(50) for _ in range(4)]
    assert (gate.used("mixed"), gate.parked()) == (3, 1)
    store.todo = ["job"]
    # The gate is full: no slot may poll its backend until a unit frees.
    assert run_tick(rt)["mixed"]["started"] == 0
    with threads_worker(app, concurrency=6):
        assert [r.get(timeout=20) for r in results] == [50] * 4
        wait_for(lambda: ("start", "job") in store.events, 10, "a slot to start the polled job")
    assert gate.used("mixed") == 1  # the polled job holds its slot until stopped
    assert rt.scheduler.stop("job") is True
    assert gate.held() == 0
    assert [k for k in slot_keys(slots, prefix) if not k.endswith(":state")] == [
        f"{{{prefix}:mixed}}:ended"  # the backend's id is remembered for the dedupe window
    ]


def test_semaphore_slots_that_clash_with_semaphore_limits_are_refused(
    make_app: Callable[..., Celery],
) -> None:
    app = make_app(semaphore_slots=[slot(1, "First", semaphore="work")])
    with pytest.raises(ConfigurationError, match="gate 'work' is sized by"):
        _ = runtime_for(app).scheduler


def test_the_keepalive_period_covers_the_shortest_slot_timeout(
    make_app: Callable[..., Celery],
) -> None:
    app = make_app(semaphore_lease=30, semaphore_slots=[slot(1, "First", timeout=3)])
    assert keepalive_interval(runtime_for(app)) == pytest.approx(1.0)
