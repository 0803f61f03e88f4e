"""Workflows: calls that require other calls, failure reaching dependents, call histories.

Real redis-server, real (threads) workers. Each node records its start and end in the probe,
so order is checked from what the workers did.
"""

from __future__ import annotations

import logging
import random
import shutil
import subprocess
import time
import types
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import TaskRevokedError

from celery_semaphore import (
    RequirementFailed,
    Workflow,
    WorkflowError,
    cancel,
    explain,
    gated,
    runtime_for,
)
from celery_semaphore.tick import run_tick

from .conftest import at_rest, slot_keys, threads_worker, wait_for


def add_tasks(app: Celery) -> types.SimpleNamespace:
    """Tasks of gate ``work``: fetch, parse, merge, boom, a plain (ungated) join, a gate."""
    probe = app.probe  # type: ignore[attr-defined]

    def mark(task_id: str, what: str) -> None:
        probe.client.rpush(probe.key("events"), f"{what} {task_id} {time.time():.6f}")

    @gated("work")
    @app.task(name="wf.fetch", bind=True, shared=False)
    def fetch(self: Any, url: str) -> str:
        probe.enter(self.request.id)
        mark(self.request.id, "start")
        time.sleep(0.02)
        mark(self.request.id, "end")
        probe.leave(self.request.id)
        return f"page:{url}"

    @gated("work")
    @app.task(name="wf.parse", bind=True, shared=False)
    def parse(self: Any, page: Any, tag: str = "") -> str:
        probe.enter(self.request.id)
        mark(self.request.id, "start")
        time.sleep(0.02)
        mark(self.request.id, "end")
        probe.leave(self.request.id)
        if isinstance(page, BaseException):
            return f"{tag}got:{type(page).__name__}"
        return f"{tag}{page}"

    @gated("work")
    @app.task(name="wf.merge", bind=True, shared=False)
    def merge(self: Any, parts: list[Any]) -> list[Any]:
        mark(self.request.id, "start")
        mark(self.request.id, "end")
        return [
            p if not isinstance(p, BaseException) else f"error:{type(p).__name__}" for p in parts
        ]

    @gated("work")
    @app.task(name="wf.boom", bind=True, shared=False)
    def boom(self: Any, *args: Any) -> None:
        mark(self.request.id, "start")
        mark(self.request.id, "end")
        raise ValueError("boom")

    @gated("work")
    @app.task(name="wf.hold", bind=True, shared=False)
    def hold(self: Any, flag: str) -> str:
        mark(self.request.id, "start")
        wait_for(lambda: probe.client.exists(probe.key(f"flag:{flag}")), 30, f"flag {flag}")
        mark(self.request.id, "end")
        return flag

    @app.task(name="wf.plain", bind=True, shared=False)
    def plain(self: Any, *parts: Any) -> list[Any]:
        mark(self.request.id, "start")
        mark(self.request.id, "end")
        return list(parts)

    @gated("work")
    @app.task(name="wf.node", bind=True, shared=False)
    def node(self: Any, *inputs: Any, name: str = "", needs: tuple[str, ...] = ()) -> str:
        mark(self.request.id, "start")
        mark(self.request.id, "end")
        return name

    return types.SimpleNamespace(
        fetch=fetch, parse=parse, merge=merge, boom=boom, hold=hold, plain=plain, node=node,
        probe=probe,
    )  # fmt: skip


def events(probe: Any) -> dict[str, dict[str, float]]:
    """task id -> {"start": t, "end": t} from the probe."""
    out: dict[str, dict[str, float]] = {}
    for raw in probe.client.lrange(probe.key("events"), 0, -1):
        what, task_id, at = raw.decode().split()
        out.setdefault(task_id, {})[what] = float(at)
    return out


def test_the_diamond_through_a_gate_of_one(make_app: Any, slots: Any, prefix: str) -> None:
    app = make_app(limit=1, semaphore_history_ttl=3.0)
    t = add_tasks(app)
    baseline = slot_keys(slots, prefix)
    wf = Workflow(app)
    a = wf.add(t.fetch.s("x"))
    b = wf.add(t.parse.s(tag="b:"), requires=[a])
    c = wf.add(t.parse.s(tag="c:"), requires=[a])
    d = wf.add(t.merge.s(), requires=[b, c])
    # Nothing waits in a worker: every node is in Redis before one runs.
    run = wf.apply_async()
    group = runtime_for(app).group("work")
    assert {n: group.record(n.id)["status"] for n in (b, c, d)} == dict.fromkeys(
        (b, c, d), "WAITING"
    )
    with threads_worker(app):
        values = run.get(timeout=30)
    assert values[d] == ["b:page:x", "c:page:x"]
    seen = events(t.probe)
    assert seen[a.id]["end"] <= seen[b.id]["start"] and seen[a.id]["end"] <= seen[c.id]["start"]
    assert max(seen[b.id]["end"], seen[c.id]["end"]) <= seen[d.id]["start"]
    assert t.probe.value("peak") == 1
    assert group.used("work") == 0
    history = group.history(d.id)
    assert [e[1] for e in history["events"]] == ["WAITING", "DISPATCHED", "RUNNING", "SUCCEEDED"]
    # The history goes after semaphore_history_ttl: the keys return to their baseline.
    wait_for(
        lambda: (
            (run_tick(runtime_for(app)) and False)
            or set(slot_keys(slots, prefix)) <= set(baseline) | set(at_rest(prefix, "work"))
        ),
        10,
        "the keys back to their baseline",
    )


def test_a_failing_requirement_fails_its_dependents_without_running_them(
    make_app: Any, slots: Any, prefix: str
) -> None:
    app = make_app(limit=1)
    t = add_tasks(app)
    errbacks = app.probe.key("errbacks")  # type: ignore[attr-defined]

    @app.task(name="wf.on_error", shared=False)
    def on_error(request: Any, exc: BaseException, traceback: Any) -> None:
        app.probe.client.rpush(errbacks, f"{request.id} {type(exc).__name__}")  # type: ignore[attr-defined]

    wf = Workflow(app)
    a = wf.add(t.fetch.s("x"))
    b = wf.add(t.boom.s(), requires=[a])
    c = wf.add(t.parse.s(), requires=[a])
    d = wf.add(t.merge.s().on_error(on_error.s()), requires=[b, c])
    e = wf.add(t.plain.s(), requires=[d])  # further down: fails too
    run = wf.apply_async()
    with threads_worker(app):
        values = run.get(timeout=30, propagate=False)
        wait_for(lambda: app.probe.client.llen(errbacks), 10, "d's link_error")  # type: ignore[attr-defined]
    assert run.results[c].state == "SUCCESS" and values[c] == "page:x"
    assert run.results[d].state == "FAILURE"
    exc = values[d]
    assert isinstance(exc, RequirementFailed)
    assert (exc.task, exc.task_id) == ("wf.boom", b.id) and "ValueError: boom" in exc.error
    assert isinstance(values[e], RequirementFailed) and values[e].task_id == d.id
    seen = events(t.probe)
    assert d.id not in seen and e.id not in seen  # never ran
    assert app.probe.client.lrange(errbacks, 0, -1) == [f"{d.id} RequirementFailed".encode()]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="boom"):
        run.get(timeout=5)  # the first failure, in the order nodes were added
    assert runtime_for(app).group("work").used("work") == 0
    # The free gate of ungated nodes is in the registry, so the tick knows it.
    registry = f"{{{prefix}:registry}}:groups"
    assert slot_keys(slots, prefix) == sorted(
        [*at_rest(prefix, "work", "semaphore.free"), registry]
    )


def test_with_pass_the_dependent_runs_and_receives_the_exception(make_app: Any) -> None:
    app = make_app(limit=2)
    t = add_tasks(app)
    wf = Workflow(app, on_requirement_failure="pass")
    a = wf.add(t.boom.s())
    b = wf.add(t.fetch.si("y"))
    d = wf.add(t.merge.s(), requires=[a, b])
    run = wf.apply_async()
    with threads_worker(app):
        values = run.get(timeout=30, propagate=False)
    assert values[d] == ["error:ValueError", "page:y"]


def test_fail_fast_cancels_what_has_not_started(make_app: Any, slots: Any, prefix: str) -> None:
    app = make_app(limit=2)
    t = add_tasks(app)
    wf = Workflow(app, fail_fast=True)
    x = wf.add(t.hold.si("release-x"))
    a = wf.add(t.fetch.s("x"))
    b = wf.add(t.boom.s(), requires=[a])
    c = wf.add(t.parse.s(), requires=[a, x])  # waits for x, which holds until told
    d = wf.add(t.merge.s(), requires=[b, c])
    run = wf.apply_async()
    with threads_worker(app):
        wait_for(lambda: run.results[c].state == "REVOKED", 20, "c cancelled by fail_fast")
        assert run.results[d].state == "REVOKED"
        assert run.results[x].state != "REVOKED"  # it runs: running nodes finish
        t.probe.client.set(t.probe.key("flag:release-x"), 1)
        assert run.results[x].get(timeout=20) == "release-x"
    seen = events(t.probe)
    assert c.id not in seen and d.id not in seen
    with pytest.raises(TaskRevokedError):
        run.results[c].get(timeout=1)
    assert runtime_for(app).group("work").used("work") == 0


def test_a_cancelled_requirement_cancels_its_dependents(make_app: Any) -> None:
    app = make_app(limit=1)
    t = add_tasks(app)
    blocker = t.hold.delay("unblock")
    wf = Workflow(app)
    a = wf.add(t.fetch.s("x"))
    b = wf.add(t.parse.s(), requires=[a])
    c = wf.add(t.plain.s(), requires=[b])
    run = wf.apply_async()
    with threads_worker(app):
        wait_for(lambda: events(t.probe).get(blocker.id), 20, "the blocker runs")
        group = runtime_for(app).group("work")
        assert group.record(a.id)["status"] == "PARKED"
        assert cancel(run.results[a]) == "parked"
        wait_for(lambda: run.results[c].state == "REVOKED", 10, "c cancelled")
        assert run.results[b].state == "REVOKED"
        t.probe.client.set(t.probe.key("flag:unblock"), 1)
        blocker.get(timeout=10)
    assert {a.id, b.id, c.id}.isdisjoint(events(t.probe))
    history = group.history(b.id)
    assert history is None or history["state"] == "CANCELLED"


def test_a_random_dag_of_200_nodes_respects_every_requirement(make_app: Any) -> None:
    app = make_app(limit=3)
    t = add_tasks(app)
    rng = random.Random(7)
    wf = Workflow(app)
    nodes: list[Any] = []
    for i in range(200):
        picks = rng.sample(nodes, k=min(len(nodes), rng.randint(0, 3)))
        nodes.append(wf.add(t.node.s(name=f"n{i}"), requires=picks))
    run = wf.apply_async()
    with threads_worker(app):
        values = run.get(timeout=120)
    assert [values[n] for n in nodes] == [f"n{i}" for i in range(200)]
    seen = events(t.probe)
    for node in nodes:
        for requirement in node.requires:
            assert seen[requirement.id]["end"] <= seen[node.id]["start"], (requirement, node)
    assert t.probe.value("peak") <= 3
    assert runtime_for(app).group("work").used("work") == 0


def test_track_logs_each_transition_of_a_two_node_workflow(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(limit=1)
    t = add_tasks(app)
    caplog.set_level(logging.INFO, logger="celery_semaphore.track")
    wf = Workflow(app, track=True)
    a = wf.add(t.fetch.s("x"))
    b = wf.add(t.parse.s(), requires=[a])
    run = wf.apply_async()
    with threads_worker(app):
        run.get(timeout=30)
    lines = [r.getMessage() for r in caplog.records if r.name == "celery_semaphore.track"]
    assert lines == [
        f"wf.parse[{b.id[:6]}] NEW->submit->WAITING",
        f"wf.fetch[{a.id[:6]}] NEW->grant->DISPATCHED",
        f"wf.fetch[{a.id[:6]}] DISPATCHED->start->RUNNING",
        f"wf.fetch[{a.id[:6]}] RUNNING->end->SUCCEEDED",
        f"wf.parse[{b.id[:6]}] WAITING->grant->DISPATCHED",
        f"wf.parse[{b.id[:6]}] DISPATCHED->start->RUNNING",
        f"wf.parse[{b.id[:6]}] RUNNING->end->SUCCEEDED",
    ]


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")
def test_the_diamond_as_dot_and_svg(make_app: Any) -> None:
    app = make_app(limit=1)
    t = add_tasks(app)
    wf = Workflow(app)
    a = wf.add(t.fetch.s("x"))
    b = wf.add(t.parse.s(), requires=[a])
    c = wf.add(t.plain.s(), requires=[a])  # not gated: outside the gate's cluster
    d = wf.add(t.merge.s(), requires=[b, c])
    dot = wf.to_dot()
    for source, target in ((a, b), (a, c), (b, d), (c, d)):
        assert f'"{source.id}" -> "{target.id}";' in dot
    assert 'subgraph "cluster_gate work"' in dot and "wf.fetch\\n" in dot
    checked = subprocess.run(["dot", "-Tsvg"], input=dot.encode(), capture_output=True)
    assert checked.returncode == 0, checked.stderr
    run = wf.apply_async()
    with threads_worker(app):
        run.get(timeout=30)
    svg = wf.to_svg()
    assert svg.lstrip().startswith("<?xml") and svg.count("palegreen") >= 4


def test_errors_at_apply_async_store_nothing(make_app: Any, slots: Any, prefix: str) -> None:
    app = make_app(limit=1)
    t = add_tasks(app)
    before = slot_keys(slots, prefix)
    wf = Workflow(app)
    a = wf.add(t.fetch.s("x"))
    b = wf.add(t.parse.s(), requires=[a])
    a.requires.append(b)
    with pytest.raises(WorkflowError, match="cycle"):
        wf.apply_async()
    other = Workflow(make_app(limit=1))
    stranger = other.add(t.fetch.s("y"))
    wf2 = Workflow(app)
    wf2.add(t.parse.s(), requires=[stranger])
    with pytest.raises(WorkflowError, match="another"):
        wf2.apply_async()
    wf3 = Workflow(app)
    wf3.add(t.parse.s(), requires=["no-such-call"])
    with pytest.raises(WorkflowError, match="not a call this app knows"):
        wf3.apply_async()
    with pytest.raises(WorkflowError, match="not a call this app knows"):
        t.parse.apply_async(requires=["no-such-call"])
    with pytest.raises(WorkflowError, match="on_requirement_failure"):
        Workflow(app, on_requirement_failure="ignore")
    with pytest.raises(WorkflowError, match="on_requirement_failure"):
        t.parse.apply_async(requires=["no-such-call"], on_requirement_failure="ignore")
    assert slot_keys(slots, prefix) == before


def test_requires_on_a_single_call_and_a_requirement_that_already_ended(
    make_app: Any,
) -> None:
    app = make_app(limit=2, semaphore_history_ttl=60.0)
    t = add_tasks(app)
    with threads_worker(app):
        first = t.fetch.delay("p")
        assert first.get(timeout=20) == "page:p"
        # Ended already: it counts at once, its result from the result backend.
        late = t.parse.apply_async(kwargs={"tag": "late:"}, requires=[first])
        assert late.get(timeout=20) == "late:page:p"
        blocker = t.hold.delay("go")
        both = t.merge.apply_async(requires=[blocker, first.id])
        # It waits in Redis, and says so where Celery users look.
        assert both.state == "WAITING"
        assert "waits for its requirements" in explain(both.id, app).reason
        t.probe.client.set(t.probe.key("flag:go"), 1)
        assert both.get(timeout=20) == ["go", "page:p"]
    seen = events(t.probe)
    assert seen[blocker.id]["end"] <= seen[both.id]["start"]


def test_a_requirement_in_another_gate_wakes_its_dependent(make_app: Any) -> None:
    app = make_app(limit=1, semaphore_limits={"work": 1, "other": 1})
    t = add_tasks(app)

    @gated("other")
    @app.task(name="wf.other", shared=False)
    def other(value: Any) -> str:
        return f"other:{value}"

    wf = Workflow(app)
    a = wf.add(t.fetch.s("x"))
    b = wf.add(other.s(), requires=[a])
    c = wf.add(t.parse.s(), requires=[b])
    run = wf.apply_async()
    with threads_worker(app):
        values = run.get(timeout=30)
    assert values[c] == "other:page:x"
    rt = runtime_for(app)
    # Every notice to the other group was acknowledged.
    assert rt.group("work").client.zcard(rt.group("work").keys["outbox"]) == 0
    assert rt.group("other").client.zcard(rt.group("other").keys["outbox"]) == 0


def test_the_state_machine_refuses_what_it_does_not_list(make_app: Any) -> None:
    app = make_app(limit=1, semaphore_history_ttl=60.0)
    t = add_tasks(app)
    rt = runtime_for(app)
    group = rt.group("work")
    blocker = t.hold.delay("never")
    waiting = t.parse.apply_async(requires=[blocker])
    # A start of a call that waits for its requirements is refused: it stays WAITING.
    verdict, *_ = group.start(waiting.id, "host:1")
    assert verdict.name == "REPARKED"
    assert group.record(waiting.id)["status"] == "WAITING"
    # So is an end of a call that never ran: nothing is freed, nothing recorded.
    assert group.release(waiting.id).released is False
    assert group.record(waiting.id)["status"] == "WAITING"
    assert cancel(waiting) == "needs"
    history = group.history(waiting.id)
    assert [e[1:] for e in history["events"]] == [["WAITING", "submit"], ["CANCELLED", "cancel"]]
    assert cancel(blocker) == "granted"


def test_a_gate_as_dot_shows_holders_and_the_next_parked_calls(make_app: Any) -> None:
    from celery_semaphore import Semaphore

    app = make_app(limit=1)
    t = add_tasks(app)
    with threads_worker(app):
        held = t.hold.delay("dot")
        wait_for(lambda: events(t.probe).get(held.id), 20, "the holder runs")
        parked = [t.fetch.delay(f"u{i}") for i in range(3)]
        dot = Semaphore("work", app=app).to_dot()
        t.probe.client.set(t.probe.key("flag:dot"), 1)
        for result in parked:
            result.get(timeout=20)
    assert f'"{held.id}" [label="wf.hold' in dot and "RUNNING" in dot
    assert all(f'"{r.id}" [label="wf.fetch' in dot for r in parked)
    assert dot.count("PARKED") == 3
    if shutil.which("dot"):
        checked = subprocess.run(["dot", "-Tsvg"], input=dot.encode(), capture_output=True)
        assert checked.returncode == 0, checked.stderr
