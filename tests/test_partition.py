"""Partitions (issue 14): a worker cut off from the gates' Redis by taking its network link down.

The worker runs in a network namespace of its own, joined to the root namespace by a veth
pair; the gates' Redis and the broker are private redis-servers it reaches over that link only
(the test and a second worker reach them on 127.0.0.1). Gate ``work`` has one unit, a 2 s
lease and a 1 s tick (run in a thread of the test process). While the link is down for longer
than lease + tick, the cut-off call's unit is reclaimed and handed to a call waiting behind it;
once the link is back the cut-off task learns it lost its unit, its late release frees nothing,
and its worker runs the next call as if nothing happened.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_semaphore import runtime_for
from celery_semaphore.group import Group
from celery_semaphore.tick import run_tick

from .conftest import ROOT, wait_for
from .faultkit import descendants
from .netnskit import GATE, BoundRedis, Netns, Processes, app_from_env, cut_off

pytestmark = pytest.mark.slow

LEASE_S = 2.0
TICK_S = 1.0
#: Seconds a tick takes to run and the test to see its effect (as in test_faults).
MARGIN = 1.0


class Ticker:
    """``run_tick`` every ``interval`` seconds in a thread, as beat would send it."""

    def __init__(self, app: Celery, interval: float) -> None:
        self.rt = runtime_for(app)
        assert self.rt is not None
        self.interval = interval
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tick", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                run_tick(self.rt)  # type: ignore[arg-type]
            except Exception as exc:  # the tick goes on, as beat's would; the test reports it
                self.errors.append(exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class Partition:
    """The namespace, the two Redis servers, the workers and the tick of one test."""

    def __init__(self, ns: Netns, tmp: Path) -> None:
        self.ns = ns
        self.prefix = f"p{uuid.uuid4().hex[:10]}"
        self.slots = BoundRedis(ns.host_ip)
        try:
            self.broker = BoundRedis(ns.host_ip)
        except BaseException:
            self.slots.stop()
            raise
        self.procs = Processes(ROOT, tmp)
        self.ticker: Ticker | None = None
        self.inside_queue, self.outside_queue = f"{self.prefix}-in", f"{self.prefix}-out"
        self.inside_env = self._env(inside=True)
        self.app = app_from_env(self._env(inside=False))

    def _env(self, *, inside: bool) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CS_NETNS="1",
            CS_SLOTS=self.slots.url(0, inside=inside),
            CS_BROKER=self.broker.url(0, inside=inside),
            CS_BACKEND=self.broker.url(1, inside=inside),
            CS_PROBE=self.broker.url(2, inside=inside),
            CS_PREFIX=self.prefix,
            CS_QUEUE=self.prefix,
            CS_LIMIT="1",
            CS_LEASE=str(LEASE_S),
            CS_TICK=str(TICK_S),
            PYTHONPATH=str(ROOT),
        )
        return env

    @property
    def gate(self) -> Group:
        rt = runtime_for(self.app)
        assert rt is not None
        return rt.group(GATE)

    @property
    def probe(self) -> Any:
        return self.app.probe  # type: ignore[attr-defined]

    def start(self) -> None:
        """Start both workers (the cut-off one inside the namespace) and the tick."""
        self.procs.worker("inside", self.inside_env, self.inside_queue, netns=self.ns)
        self.procs.worker("outside", self._env(inside=False), self.outside_queue, pool="threads")
        for name in ("inside", "outside"):
            host = f"{name}@{os.uname().nodename}"
            ping = self.app.control.ping
            wait_for(lambda: ping([host], timeout=0.3), 60, f"{host} to answer a ping")  # noqa: B023
        self.ticker = Ticker(self.app, TICK_S)

    def call(self, task: str, *args: Any, queue: str) -> Any:
        return self.app.tasks[f"part.{task}"].apply_async(args, queue=queue)

    def started(self, task_id: str) -> dict[str, Any]:
        """The start event of ``task_id`` (its fence, its process), once it ran."""
        found = wait_for(lambda: self.probe.events("start", task_id), 20, f"{task_id} to start")
        return found[-1]  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop everything; print the workers' logs (pytest shows them when the test failed)."""
        if self.ticker is not None:
            self.ticker.stop()
        self.procs.stop_all()
        self.slots.stop()
        self.broker.stop()
        for name in ("inside", "outside"):
            print(f"--- {name} worker log ---\n{self.procs.output(name)}")


@pytest.fixture
def partition(tmp_path: Path) -> Iterator[Partition]:
    """Everything of the test, removed at its end (processes, servers, link, namespace)."""
    with cut_off() as ns:
        part = Partition(ns, tmp_path)
        try:
            yield part
        finally:
            part.close()


def test_a_worker_cut_off_from_redis_loses_its_unit_to_a_higher_fence_and_carries_on_after(
    partition: Partition, record_property: Any
) -> None:
    p = partition
    p.start()
    gate, probe = p.gate, p.probe
    flag_a, flag_b = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]

    # A holds the only unit, in the namespace; it asks holds_slot() every 0.1 s.
    a = p.call("hold", flag_a, queue=p.inside_queue)
    fence_a = p.started(a.id)["fence"]
    wait_for(lambda: any(c["holds"] is True for c in probe.events("check", a.id)), 10, "A to hold")
    b = p.call("hold", flag_b, queue=p.outside_queue)
    assert gate.parked() == 1 and list(gate.holders()) == [a.id]

    # Cut the link. A's lease was renewed at most a third of a lease ago; its last deadline
    # is the one seen last before the tick reclaimed it.
    deadlines: list[int] = []

    def reclaimed() -> bool:
        holders = gate.holders()
        if a.id in holders:
            deadlines.append(holders[a.id])
        return a.id not in holders

    down = time.time()
    p.ns.down()
    down_done = time.time()
    wait_for(reclaimed, LEASE_S + TICK_S + MARGIN + 5, "A's unit to be reclaimed")
    reclaimed_after = time.time() - down
    past_deadline = time.time() - deadlines[-1] / 1000
    # B, waiting behind A, is handed the unit and runs in the root namespace's worker.
    started_b = p.started(b.id)
    assert started_b["fence"] > fence_a
    time.sleep(max(0.0, down + LEASE_S + TICK_S + 1.0 - time.time()))  # down > lease + tick
    up = time.time()
    p.ns.up()
    up_done = time.time()
    record_property("reclaimed_after_link_down_s", round(reclaimed_after, 3))
    record_property("link_down_s", round(up - down, 3))
    record_property("reclaimed_past_deadline_s", round(past_deadline, 3))
    print(
        f"\nlink down {time.strftime('%H:%M:%S', time.localtime(down))} for {up - down:.2f} s; "
        f"A's unit reclaimed {reclaimed_after:.2f} s after, {past_deadline:.2f} s after its last "
        f"lease deadline (lease {LEASE_S} s, tick {TICK_S} s)"
    )
    assert reclaimed_after <= LEASE_S + TICK_S + MARGIN
    assert 0 <= past_deadline <= TICK_S + MARGIN  # not before its lease ended, nor long after

    # A's task could not reach the gates' Redis while cut off (asked after the link went
    # down, answered before it came back), and learns it lost its unit once the link is back.
    def checks(after: float, before: float = float("inf")) -> list[Any]:
        found = probe.events("check", a.id)
        return [c["holds"] for c in found if c["asked"] > after and c["t"] < before]

    wait_for(lambda: False in checks(up_done), 20, "A's holds_slot() to answer once back")
    lost = [c["t"] for c in probe.events("check", a.id) if c["asked"] > up_done and not c["holds"]]
    record_property("lease_lost_seen_after_link_up_s", round(min(lost) - up_done, 3))
    during = checks(down_done, up)
    assert during and all(str(h).startswith("error") for h in during), during
    assert True not in checks(up_done)

    # A ends now, while B holds the unit and C waits behind it: A's late release (old fence,
    # its record reclaimed) must free nothing of B's.
    c = p.call("sleep", 20, queue=p.outside_queue)
    wait_for(lambda: gate.parked() == 1, 5, "C to park")
    held_before, record_b = gate.used(GATE), gate.record(b.id)
    assert held_before == 1 and list(gate.holders()) == [b.id]
    probe.set_flag(flag_a)
    assert a.get(timeout=30) == {"fence": fence_a}
    wait_for(lambda: probe.events("postrun", a.id), 10, "A's release to be done")
    assert gate.used(GATE) == 1
    assert list(gate.holders()) == [b.id]
    assert gate.record(b.id) == record_b
    assert gate.parked() == 1 and not probe.events("start", c.id)

    probe.set_flag(flag_b)
    assert b.get(timeout=15) == {"fence": started_b["fence"]}
    assert c.get(timeout=15) == 20
    fence_c = probe.events("start", c.id)[-1]["fence"]
    assert fence_c > started_b["fence"]

    # The cut-off worker carries on: it runs the next call normally, under a higher fence.
    sent = time.time()
    d = p.call("sleep", 20, queue=p.inside_queue)
    assert d.get(timeout=30) == 20
    record_property("next_call_inside_s", round(time.time() - sent, 3))
    started_d = probe.events("start", d.id)[-1]
    assert started_d["fence"] > fence_c
    inside_pid = p.procs.procs[0].pid
    assert started_d["pid"] in descendants(inside_pid) | {inside_pid}
    wait_for(lambda: gate.held() == 0 and gate.parked() == 0, 5, "the gate to be at rest")
    assert p.ticker is not None and p.ticker.errors == []
