"""Release order and what a call needs, end to end: real @gated tasks, a threads worker.

The tasks run in this process, so a :class:`Meter` counts what they hold exactly. Calls are
sent before the worker starts where the test is about who gets room first: what the gate
granted at submit is then in the broker together, and the tasks wait for each other (with a
timeout) so that the peak the gate allows is reached for certain, not by luck of timing.
"""

from __future__ import annotations

import collections
import math
import random
import threading
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import redis
from celery import Celery

from celery_semaphore import gated, runtime_for
from celery_semaphore.tick import run_tick

from .conftest import at_rest, slot_keys, threads_worker, wait_for

HOLD_S = 10.0  # longest a task waits for the others it should run beside


class Meter:
    """Units running now per label, their peaks, violations of limits, and the start order."""

    def __init__(self, limits: Mapping[str, int] | None = None) -> None:
        self.limits = dict(limits or {})
        self.running: collections.Counter[str] = collections.Counter()
        self.peak: collections.Counter[str] = collections.Counter()
        self.started: list[str] = []
        self.over: list[tuple[str, int]] = []
        self.cond = threading.Condition()

    def enter(self, call: str, units: Mapping[str, int]) -> None:
        with self.cond:
            for label, n in units.items():
                self.running[label] += n
                self.peak[label] = max(self.peak[label], self.running[label])
                if label in self.limits and self.running[label] > self.limits[label]:
                    self.over.append((label, self.running[label]))
            self.started.append(call)
            self.cond.notify_all()

    def leave(self, units: Mapping[str, int]) -> None:
        with self.cond:
            self.running.subtract(units)
            self.cond.notify_all()

    def hold_until(self, predicate: Callable[[Meter], bool]) -> None:
        """Wait (at most HOLD_S) until ``predicate(meter)``: the calls that must overlap do."""
        with self.cond:
            self.cond.wait_for(lambda: predicate(self), timeout=HOLD_S)

    def run(self, call: str, units: Mapping[str, int], until: Callable[[Meter], bool]) -> str:
        self.enter(call, units)
        try:
            self.hold_until(until)
        finally:
            self.leave(units)
        return call


def peaks_reached(peaks: Mapping[str, int]) -> Callable[[Meter], bool]:
    return lambda m: all(m.peak[label] >= n for label, n in peaks.items())


def broker_keys(urls: dict[str, str], prefix: str) -> list[str]:
    """Keys of this test's queue in the broker (a queue's binding is not a message)."""
    client = redis.Redis.from_url(urls["broker"])
    return sorted(
        k.decode()
        for k in client.scan_iter(match=f"*{prefix}*", count=1000)
        if not k.startswith(b"_kombu.binding.")
    )


# -- priorities -----------------------------------------------------------------------------


def test_a_gate_of_one_starts_calls_by_priority_then_in_sending_order(
    make_app: Callable[..., Celery], prefix: str
) -> None:
    app = make_app()
    meter, go = Meter({"prio": 1}), threading.Event()

    @gated("prio", limit=1)
    @app.task(name=f"{prefix}.step", shared=False)
    def step(call: str) -> str:
        meter.enter(call, {"prio": 1})
        try:
            if call == "blocker":
                go.wait(HOLD_S)
        finally:
            meter.leave({"prio": 1})
        return call

    group = runtime_for(app).group("prio")
    rng = random.Random(5)
    priorities = [rng.choice((0, 3, 9, 200, 255)) for _ in range(24)]
    with threads_worker(app, concurrency=4):
        blocker = step.delay("blocker")
        wait_for(lambda: meter.started == ["blocker"], 20, "the blocker to start")
        results = [step.apply_async((f"c{i}",), priority=p) for i, p in enumerate(priorities)]
        assert (group.used("prio"), group.parked()) == (1, 24)
        go.set()
        assert [r.get(timeout=30) for r in [blocker, *results]] == ["blocker"] + [
            f"c{i}" for i in range(24)
        ]
    expected = [f"c{i}" for i in sorted(range(24), key=lambda i: (-priorities[i], i))]
    assert meter.started == ["blocker", *expected]
    assert meter.over == []


def test_the_decorator_sets_a_default_priority_that_a_call_overrides(
    make_app: Callable[..., Celery], prefix: str, slots: redis.Redis
) -> None:
    app = make_app()
    meter, go = Meter({"prio": 1}), threading.Event()

    def body(call: str) -> str:
        meter.enter(call, {"prio": 1})
        try:
            if call == "blocker":
                go.wait(HOLD_S)
        finally:
            meter.leave({"prio": 1})
        return call

    urgent = gated("prio", limit=1, priority=7)(
        app.task(name=f"{prefix}.urgent", shared=False)(body)
    )
    routine = gated("prio", limit=1)(app.task(name=f"{prefix}.routine", shared=False)(body))
    with threads_worker(app, concurrency=4):
        blocker = routine.delay("blocker")
        wait_for(lambda: meter.started == ["blocker"], 20, "the blocker to start")
        results = [
            routine.delay("routine-0"),
            urgent.delay("urgent-7"),
            routine.apply_async(("routine-9",), priority=9),
            urgent.apply_async(("urgent-0",), priority=0),
            urgent.delay("urgent-7-later"),
        ]
        go.set()
        for r in [blocker, *results]:
            r.get(timeout=30)
    assert meter.started == [
        "blocker",
        "routine-9",
        "urgent-7",
        "urgent-7-later",
        "routine-0",
        "urgent-0",
    ]
    assert slot_keys(slots, prefix) == at_rest(prefix, "prio")


# -- start times ----------------------------------------------------------------------------


def test_a_countdown_call_holds_no_room_while_it_waits_and_starts_within_a_tick_of_its_time(
    make_app: Callable[..., Celery], prefix: str
) -> None:
    tick_s = 1.0
    app = make_app(semaphore_tick_interval=tick_s)
    rt = runtime_for(app)
    meter = Meter({"later": 1})
    started_ms: dict[str, int] = {}

    @gated("later", limit=1)
    @app.task(name=f"{prefix}.timed", shared=False)
    def timed(call: str) -> str:
        s, us = rt.client.time()
        started_ms[call] = s * 1000 + us // 1000
        meter.enter(call, {"later": 1})
        meter.leave({"later": 1})
        return call

    group = rt.group("later")
    with threads_worker(app, concurrency=2):
        late = timed.apply_async(("late",), countdown=2)
        due_ms = group.record(late.id)["ready_ms"]
        assert (group.waiting(), group.used("later"), group.held()) == (1, 0, 0)
        # The gate of one is free meanwhile: a call sent after it runs first.
        assert timed.delay("now").get(timeout=20) == "now"
        assert "late" not in meter.started
        # No beat here: this loop is the beat, running the tick far more often than tick_s.
        wait_for(lambda: run_tick(rt) is not None and "late" in meter.started, 20, "late")
        assert late.get(timeout=20) == "late"
    assert meter.started == ["now", "late"]
    assert due_ms <= started_ms["late"] <= due_ms + tick_s * 1000
    assert (group.held(), group.waiting(), group.parked()) == (0, 0, 0)


# -- per-key limits -------------------------------------------------------------------------


def test_each_key_runs_at_most_its_key_limit_with_overrides_from_decorator_and_settings(
    make_app: Callable[..., Celery], prefix: str, slots: redis.Redis
) -> None:
    caps = {"a": 2, "b": 2, "vip": 3, "gold": 4}
    app = make_app(semaphore_key_limits={"tenant": {"gold": 4}})
    meter = Meter(caps)

    @gated("tenant", limit=20, key=lambda tenant, n: tenant, key_limit=2, key_limits={"vip": 3})
    @app.task(name=f"{prefix}.per_tenant", shared=False)
    def per_tenant(tenant: str, n: int) -> str:
        return meter.run(f"{tenant}{n}", {tenant: 1}, lambda m: m.peak[tenant] >= caps[tenant])

    group = runtime_for(app).group("tenant")
    results = [per_tenant.delay(key, n) for n in range(6) for key in caps]
    # What the gate granted at submit: each key up to its own limit, the rest waits.
    assert group.key_usage() == {("tenant", key): cap for key, cap in caps.items()}
    assert group.parked() == 24 - sum(caps.values())
    with threads_worker(app, concurrency=16):
        assert len({r.get(timeout=60) for r in results}) == 24
    assert dict(meter.peak) == caps
    assert meter.over == []
    assert slot_keys(slots, prefix) == at_rest(prefix, "tenant")


# -- stacked gates --------------------------------------------------------------------------


def test_stacked_gates_each_reach_exactly_their_limit_and_never_more(
    make_app: Callable[..., Celery], prefix: str, slots: redis.Redis
) -> None:
    limits = {"api": 2, "db": 1}
    app = make_app()
    meter = Meter(limits)
    until = peaks_reached(limits)

    @gated("api", limit=2, group="g")
    @gated("db", limit=1, group="g")
    @app.task(name=f"{prefix}.both", shared=False)
    def both(n: int) -> str:
        return meter.run(f"both{n}", {"api": 1, "db": 1}, until)

    @gated("db", limit=1, group="g")
    @app.task(name=f"{prefix}.db_only", shared=False)
    def db_only(n: int) -> str:
        return meter.run(f"db{n}", {"db": 1}, until)

    @gated("api", limit=2, group="g")
    @app.task(name=f"{prefix}.api_only", shared=False)
    def api_only(n: int) -> str:
        return meter.run(f"api{n}", {"api": 1}, until)

    group = runtime_for(app).group("g")
    results = [task.delay(n) for n in range(5) for task in (both, db_only, api_only)]
    # A stacked call that cannot have both gates holds neither.
    assert (group.used("api"), group.used("db"), group.held()) == (2, 1, 2)
    with threads_worker(app, concurrency=8):
        assert len({r.get(timeout=60) for r in results}) == 15
    assert dict(meter.peak) == limits
    assert meter.over == []
    assert slot_keys(slots, prefix) == at_rest(prefix, "g")


# -- weights --------------------------------------------------------------------------------


def test_a_call_of_weight_two_on_a_gate_of_four_runs_at_most_two_at_once(
    make_app: Callable[..., Celery], prefix: str
) -> None:
    app = make_app()
    meter = Meter({"units": 4, "calls": 2})

    @gated("heavy", limit=4, weight=2)
    @app.task(name=f"{prefix}.heavy", shared=False)
    def heavy(n: int) -> str:
        return meter.run(f"h{n}", {"units": 2, "calls": 1}, peaks_reached({"calls": 2}))

    group = runtime_for(app).group("heavy")
    results = [heavy.delay(n) for n in range(7)]
    assert (group.used("heavy"), group.held(), group.parked()) == (4, 2, 5)
    with threads_worker(app, concurrency=6):
        assert len({r.get(timeout=60) for r in results}) == 7
    assert dict(meter.peak) == {"units": 4, "calls": 2}
    assert meter.over == []


def test_running_weights_sum_to_the_limit_at_peak(
    make_app: Callable[..., Celery], prefix: str
) -> None:
    app = make_app()
    meter = Meter({"units": 4})

    @gated("weighed", limit=4, weight=lambda n, w: w)
    @app.task(name=f"{prefix}.weighed", shared=False)
    def weighed(n: int, w: int) -> str:
        return meter.run(f"w{n}", {"units": w}, peaks_reached({"units": 4}))

    group = runtime_for(app).group("weighed")
    weights = [1, 3, 2, 2, 4, 1, 1, 3, 2, 1]
    results = [weighed.delay(n, w) for n, w in enumerate(weights)]
    assert group.used("weighed") == 4
    with threads_worker(app, concurrency=6):
        assert len({r.get(timeout=60) for r in results}) == len(weights)
    assert meter.peak["units"] == 4
    assert meter.over == []


# -- bad input ------------------------------------------------------------------------------


def _key_raises(tenant: str) -> str:
    raise KeyError(tenant)


def echo(tenant: str) -> str:
    return tenant


def nothing() -> None:
    return None


DECORATION_ERRORS = {
    "unknown option": ({"limat": 1}, TypeError, "limat"),
    "priority 256": ({"limit": 2, "priority": 256}, ValueError, "priority"),
    "priority as text": ({"limit": 2, "priority": "7"}, ValueError, "priority"),
    "weight 0": ({"limit": 4, "weight": 0}, ValueError, "weight"),
    "weight above the limit": ({"limit": 4, "weight": 5}, ValueError, "weight"),
    "key limit 0": (
        {"limit": 4, "key": lambda t: t, "key_limits": {"acme": 0}},
        ValueError,
        "key limit",
    ),
    "lease nan": ({"limit": 2, "lease": math.nan}, ValueError, "lease"),
    "lease inf": ({"limit": 2, "lease": math.inf}, ValueError, "lease"),
    "lease under a second": ({"limit": 2, "lease": 0.5}, ValueError, "lease"),
}


@pytest.mark.parametrize("case", sorted(DECORATION_ERRORS))
def test_a_bad_option_is_refused_when_applied_naming_gate_and_option(
    make_app: Callable[..., Celery],
    prefix: str,
    slots: redis.Redis,
    urls: dict[str, str],
    case: str,
) -> None:
    options, error, option = DECORATION_ERRORS[case]
    app = make_app()
    with pytest.raises(error) as raised:
        gated("bad", **options)(app.task(name=f"{prefix}.bad", shared=False)(echo))
    assert "'bad'" in str(raised.value)
    assert option in str(raised.value)
    assert slot_keys(slots, prefix) == []
    assert broker_keys(urls, prefix) == []


def test_bare_gated_on_a_task_named_with_braces_is_refused_naming_it(
    make_app: Callable[..., Celery], prefix: str, slots: redis.Redis, urls: dict[str, str]
) -> None:
    app = make_app()
    task = app.task(name=f"{prefix}.{{tenant}}", shared=False)(nothing)
    with pytest.raises(ValueError, match=r"gate name.*\{tenant\}"):
        gated(task)
    assert slot_keys(slots, prefix) == []
    assert broker_keys(urls, prefix) == []


CALL_ERRORS: dict[str, tuple[dict[str, Any], dict[str, Any], type[Exception], str]] = {
    "priority 256": ({}, {"priority": 256}, ValueError, "priority"),
    "priority as text": ({}, {"priority": "7"}, ValueError, "priority"),
    "weight function gives 0": ({"weight": lambda t: 0}, {}, ValueError, "weight"),
    "weight function gives more than the limit": (
        {"weight": lambda t: 5},
        {},
        ValueError,
        "weight",
    ),
    "key function raises": ({"key": _key_raises}, {}, ValueError, "key function"),
    "key function gives an empty key": ({"key": lambda t: ""}, {}, TypeError, "key function"),
    "key function gives a number": ({"key": lambda t: 5}, {}, TypeError, "key function"),
}


@pytest.mark.parametrize("case", sorted(CALL_ERRORS))
def test_a_bad_call_is_refused_naming_gate_and_option_with_nothing_written(
    make_app: Callable[..., Celery],
    prefix: str,
    slots: redis.Redis,
    urls: dict[str, str],
    case: str,
) -> None:
    options, call_options, error, option = CALL_ERRORS[case]
    app = make_app()
    task = gated("picky", limit=4, **options)(app.task(name=f"{prefix}.picky", shared=False)(echo))
    with pytest.raises(error) as raised:
        task.apply_async(("acme",), **call_options)
    assert "'picky'" in str(raised.value)
    assert option in str(raised.value)
    assert slot_keys(slots, prefix) == []
    assert broker_keys(urls, prefix) == []
