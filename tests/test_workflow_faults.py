"""Workflows under faults: real ``celery worker -P prefork`` subprocesses (``tests.faultproj``)
killed with SIGKILL while a node runs, and the invariants that must survive it.

Every node is ``fault.step``: gate ``work`` of limit 2, ``acks_late`` and
``reject_on_worker_lost``, so a killed run comes back from the broker and runs again. The
probe records every start and end, with the inputs the run received.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from celery import states

from celery_semaphore import Node, Workflow, WorkflowRun

from . import faultproj
from .conftest import wait_for
from .faultkit import Cluster, Run, cluster_fixture, peak_overlap  # noqa: F401

pytestmark = pytest.mark.slow

#: The graph, in layers: node name -> the names it requires (two for most middle nodes).
GRAPH: dict[str, tuple[str, ...]] = {
    "a0": (), "a1": (), "a2": (),
    "b0": ("a0",), "b1": ("a0", "a1"), "b2": ("a1", "a2"),
    "c0": ("b0", "b1"), "c1": ("b1",), "c2": ("b2", "a2"),
    "d0": ("c0", "c1"), "d1": ("c2",),
    "e": ("d0", "d1"),
}  # fmt: skip
#: The node killed while it runs: in the middle, with two requirements and three dependents.
VICTIM = "b1"


def build(cluster: Cluster, flag: str) -> tuple[Workflow, dict[str, Node]]:
    """The workflow of ``GRAPH``; the victim runs until ``flag`` is set."""
    step = cluster.app.tasks["fault.step"]
    wf = Workflow(cluster.app)
    nodes: dict[str, Node] = {}
    for name, requires in GRAPH.items():
        options: dict[str, Any] = {"name": name, "ms": 100}
        if name == VICTIM:
            options["flag"] = flag
        nodes[name] = wf.add(step.s(**options), requires=[nodes[r] for r in requires])
    return wf, nodes


def expected_inputs(name: str) -> list[Any]:
    """What node ``name`` receives: its requirement's result, or a list of them for several."""
    requires = GRAPH[name]
    if not requires:
        return []
    return [requires[0]] if len(requires) == 1 else [list(requires)]


def final(run: WorkflowRun) -> bool:
    return all(r.state in states.READY_STATES for r in run.results.values())


def assert_at_rest(cluster: Cluster, slots: redis.Redis, node_ids: list[str]) -> None:
    """Nothing held, parked, delayed or waiting for a requirement; no node still recorded."""
    gate = cluster.gate

    def rest() -> dict[str, int]:
        live = sum(1 for i in node_ids if gate.record(i) is not None)
        return {
            "used": gate.used(faultproj.GATE),
            "aux used": gate.used(faultproj.AUX),
            "key units": sum(gate.key_usage().values()),
            "held": gate.held(),
            "parked": gate.parked(),
            "delayed": gate.waiting(),
            "live records": live,
            "calls": int(slots.hlen(gate.keys["calls"])),
            "messages": int(slots.hlen(gate.keys["messages"])),
            "dependents": int(slots.hlen(gate.keys["dependents"])),
            "outbox": int(slots.zcard(gate.keys["outbox"])),
        }

    zero = dict.fromkeys(rest(), 0)
    wait_for(lambda: rest() == zero, cluster.lease + 3 * cluster.tick + 1.0, "the gate at rest")
    assert rest() == zero


@pytest.fixture(params=["plain", "keyed"])
def gate_shape(request: pytest.FixtureRequest) -> str:
    """As in test_faults: the plain gate, and ``work`` keyed, weighted and stacked with ``aux``."""
    return str(request.param)


@pytest.mark.parametrize("kill", ["child", "worker"])
def test_a_worker_killed_mid_workflow_with_acks_late_still_ends_every_node_in_order(
    cluster: Cluster, slots: redis.Redis, kill: str
) -> None:
    # A whole worker's unacked messages come back after the visibility timeout; it must
    # outlast lease + tick, so the redelivery is not taken for a live duplicate of the dead run.
    cluster.configure(CS_LIMIT="2", **({"CS_VISIBILITY": "3"} if kill == "worker" else {}))
    fv = uuid.uuid4().hex[:8]
    wf, nodes = build(cluster, fv)
    ids = {name: node.id for name, node in nodes.items()}
    names = {node_id: name for name, node_id in ids.items()}
    run = wf.apply_async()

    w1 = cluster.worker("w1", 2)
    cluster.beat()
    victim = cluster.wait_started(ids[VICTIM], timeout=30)
    if kill == "child":
        cluster.kill_pid(victim["pid"])  # the worker lives on and replaces its child
    else:
        cluster.kill_worker(w1)
        cluster.worker("w2", 2)
    cluster.probe.set_flag(fv)  # the victim's next run ends by itself

    wait_for(lambda: final(run), 45, "every node to reach a final state")
    ended = {names[r.id]: r.state for r in run.results.values()}
    assert all(state in states.READY_STATES for state in ended.values()), ended
    # Late acks: the killed run came back and ran again, so nothing failed or was cancelled.
    assert ended == dict.fromkeys(GRAPH, states.SUCCESS), ended
    assert {n: r.get(timeout=1) for n, r in run.results.items()} == {
        node: name for name, node in nodes.items()
    }

    events = cluster.probe.events()
    runs: list[Run] = cluster.runs()

    def recorded(end: dict[str, Any]) -> bool:
        return any(
            e["ev"] == "postrun" and e["id"] == end["id"] and e["pid"] == end["pid"]
            for e in events
            if e["t"] >= end["t"]
        )

    assert any(r.killed and r.task_id == ids[VICTIM] for r in runs), events
    for name, node_id in ids.items():
        # At least once, and no more: a node runs again only after a run of it was cut, killed
        # in its body or between its body's end and the record of that end (no ``postrun``
        # from its process): with acks_late the broker brings either back.
        killed = sum(1 for r in runs if r.task_id == node_id and r.killed)
        cut = sum(1 for e in events if e["ev"] == "end" and e["id"] == node_id and not recorded(e))
        assert cluster.count("start", node_id) == 1 + killed + cut, (name, events)
        ends = [e for e in events if e["ev"] == "end" and e["id"] == node_id]
        assert ends, f"{name} never finished a run: {events}"
        assert ends[-1]["got"] == expected_inputs(name), (name, ends[-1])

    # A dependent starts (every run of it) only once every run of each requirement ended,
    # a killed run at its kill.
    first_start = {n: min(r.start for r in runs if r.task_id == ids[n]) for n in GRAPH}
    last_end = {n: max(r.end for r in runs if r.task_id == ids[n]) for n in GRAPH}
    for name, requires in GRAPH.items():
        for req in requires:
            assert last_end[req] <= first_start[name], (name, req, events)
    assert peak_overlap(runs) == 2, runs

    assert_at_rest(cluster, slots, list(ids.values()))
