"""The admin API: status, holders, parked, explain, metrics, and the operations on a gate.

Real redis-server, real (threads) workers; every operation is checked by what the workers do
next.
"""

from __future__ import annotations

import time
import types
from typing import Any

import pytest
from celery import Celery

from celery_semaphore import Semaphore, UnknownCall, explain, gated, gates, runtime_for
from celery_semaphore.tick import run_tick

from .conftest import threads_worker, wait_for


def add_tasks(app: Celery) -> types.SimpleNamespace:
    """``hold`` (until a flag), ``quick``, ``keyed`` (per tenant) on gate ``work``."""
    probe = app.probe  # type: ignore[attr-defined]

    def held_until(task_id: str, flag: str) -> None:
        probe.enter(task_id)
        try:
            wait_for(lambda: probe.client.exists(probe.key(f"flag:{flag}")), 30, f"flag {flag}")
        finally:
            probe.leave(task_id)

    @gated("work")
    @app.task(name="ops.hold", bind=True, shared=False)
    def hold(self: Any, flag: str) -> str:
        held_until(self.request.id, flag)
        return flag

    @gated("work")
    @app.task(name="ops.quick", bind=True, shared=False)
    def quick(self: Any, tag: str = "") -> str:
        probe.enter(self.request.id)
        probe.leave(self.request.id)
        return tag

    @gated("work", key=lambda tenant, flag: tenant, key_limit=1)
    @app.task(name="ops.keyed", bind=True, shared=False)
    def keyed(self: Any, tenant: str, flag: str) -> str:
        held_until(self.request.id, flag)
        return tenant

    def release(flag: str) -> None:
        probe.client.set(probe.key(f"flag:{flag}"), 1)

    return types.SimpleNamespace(hold=hold, quick=quick, keyed=keyed, probe=probe, release=release)


def test_status_holders_parked_and_explain_tell_the_truth(make_app: Any) -> None:
    app = make_app(limit=2, semaphore_history_ttl=60.0)
    t = add_tasks(app)
    gate = Semaphore("work", app=app)
    with threads_worker(app):
        running = [t.hold.delay("a"), t.hold.delay("a")]
        wait_for(lambda: t.probe.value("running") == 2, 20, "two running")
        parked = [t.quick.apply_async(("p",), priority=p) for p in (0, 9, 0)]
        later = t.quick.apply_async(("later",), countdown=60)
        s = gate.status()
        assert (s.limit, s.held, s.holders, s.parked, s.waiting_time, s.paused) == (
            2, 2, 2, 3, 1, False,
        )  # fmt: skip
        assert s.oldest_parked_s is not None and s.oldest_parked_s >= 0
        who = gate.holders()
        assert {h.task_id for h in who} == {r.id for r in running}
        assert all(h.task == "ops.hold" and h.state == "RUNNING" and h.pid for h in who)
        assert all(0 < h.lease_left_s <= 30 for h in who)
        # Release order: the priority 9 call first, then the two others in order.
        order = [c.task_id for c in gate.parked()]
        assert order == [parked[1].id, parked[0].id, parked[2].id]
        assert [c.position for c in gate.parked(offset=1, count=1)] == [2]
        # Where a user looks: the result state, and the story.
        assert parked[0].state == "PARKED" and later.state == "WAITING"
        story = explain(parked[0].id, app)
        assert story.state == "PARKED" and story.position == 2
        assert "gate work is full (2 of 2 units held)" in story.reason
        assert "start time" in explain(later.id, app).reason
        assert "runs on" in explain(running[0].id, app).reason
        t.release("a")
        for result in (*running, *parked):
            result.get(timeout=20)
    ended = explain(parked[0].id, app)
    assert ended.final and ended.state == "SUCCEEDED"
    assert [e.state for e in ended.events] == ["PARKED", "DISPATCHED", "RUNNING", "SUCCEEDED"]
    with pytest.raises(UnknownCall):
        explain("no-such-call", app)
    assert [g.gate for g in gates(app)] == ["work"]


def test_resize_is_live_both_ways(make_app: Any) -> None:
    app = make_app(limit=1)
    t = add_tasks(app)
    gate = Semaphore("work", app=app)
    with threads_worker(app):
        calls = [t.hold.delay("r") for _ in range(5)]
        wait_for(lambda: t.probe.value("running") == 1, 20, "one running")
        assert gate.resize(3) == 1
        # Raising hands the new room to parked calls at once, not at the next tick.
        wait_for(lambda: t.probe.value("running") == 3, 5, "three running")
        gate.resize(1)  # lowering kills nothing, it only stops new grants
        assert t.probe.value("running") == 3
        t.release("r")
        for result in calls:
            result.get(timeout=20)
    assert t.probe.value("peak") == 3
    assert [op.what for op in gate.journal()] == ["resize work 3 -> 1", "resize work 1 -> 3"]


def test_pause_parks_everything_and_resume_releases_at_once(make_app: Any) -> None:
    app = make_app(limit=2)
    t = add_tasks(app)
    gate = Semaphore("work", app=app)
    with threads_worker(app):
        gate.pause()
        calls = [t.quick.delay(str(i)) for i in range(4)]
        time.sleep(0.5)  # a paused gate must not start anything meanwhile
        assert t.probe.value("done") == 0 and gate.status().paused
        assert gate.status().parked == 4
        run_tick(runtime_for(app))  # the tick does not release a paused gate either
        assert t.probe.value("done") == 0
        gate.resume()
        for result in calls:
            result.get(timeout=10)
    assert gate.status().counters["parked"] == 4


def test_cancel_purge_and_a_key_limit_resized(make_app: Any) -> None:
    app = make_app(limit=3)
    t = add_tasks(app)
    gate = Semaphore("work", app=app)
    with threads_worker(app):
        first = t.keyed.delay("acme", "k")
        wait_for(lambda: t.probe.value("running") == 1, 20, "acme's first call runs")
        second = t.keyed.delay("acme", "k")
        assert gate.status().parked == 1  # key_limit 1
        gate.resize(2, key="acme")
        wait_for(lambda: t.probe.value("running") == 2, 5, "acme's second call runs")
        blocker = t.hold.delay("b")
        wait_for(lambda: t.probe.value("running") == 3, 20, "the gate full")
        waiting = [t.quick.delay(str(i)) for i in range(5)]
        assert gate.cancel(waiting[0].id) == "parked"
        assert gate.purge() == 4
        assert gate.status().parked == 0
        wait_for(lambda: all(r.state == "REVOKED" for r in waiting), 10, "every result REVOKED")
        t.release("k")
        t.release("b")
        for result in (first, second, blocker):
            result.get(timeout=20)
    assert t.probe.value("done") == 3  # none of the cancelled or purged calls ran
    counters = gate.metrics().counters
    assert counters["cancelled"] == 5 and counters["granted"] == 3
    assert counters["released"] == 3
    hold = gate.metrics().hold
    assert hold.count == 3 and hold.buckets[-1] == (float("inf"), 3)
