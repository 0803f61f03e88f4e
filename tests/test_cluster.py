"""The gates on a real Redis Cluster (tests/clusterkit.py: three masters, one replica each).

Only the gates' Redis (``semaphore_redis_url``) is the cluster; the broker, the result
backend and the probe counters stay on the session's private plain redis-server.

1. The core end-to-end test, with each spelling of a cluster URL.
2. Stacked gates, in groups whose hash tags land on three different masters.
3. A workflow whose nodes are in gates on different masters.
4. The tick: a vanished holder reclaimed, and the tick's index (another slot's key, written
   by the client) empty once everything is idle.
5. A failover soak: the master of the gate's slot SIGKILLed under a stream of calls, with
   its replica in sync and lagging; the figures of the over-admission window are printed.

1-4 run an in-process threads worker; 5 a prefork worker and a beat as subprocesses
(tests/faultkit.py).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from celery.states import READY_STATES
from redis.cluster import RedisCluster

from celery_semaphore import (
    AcceptanceUnknown,
    CallDropped,
    RedisUnavailable,
    Workflow,
    gated,
    runtime_for,
)
from celery_semaphore.due import GRACE_S, index_key
from celery_semaphore.group import Acquired, keys_for
from celery_semaphore.server import free_port
from celery_semaphore.tick import run_tick

from .clusterkit import LocalCluster, redis_cluster_fixture  # noqa: F401
from .conftest import acquire, at_rest, threads_worker, wait_for
from .faultkit import cluster_fixture, peak_overlap  # noqa: F401
from .test_order import Meter, peaks_reached


@pytest.fixture
def gates_cluster(redis_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The session's cluster, whole again if an earlier test killed a node."""
    if not redis_cluster.healthy():
        redis_cluster.heal()
    yield redis_cluster


@pytest.fixture
def cluster_app(
    make_app: Callable[..., Celery], gates_cluster: LocalCluster
) -> Callable[..., Celery]:
    """This test's app (tests/proj.py) with its gates on the cluster."""

    def make(limit: int = 3, url_form: str = "seeds", **conf: Any) -> Celery:
        if url_form == "node":
            conf["semaphore_redis_cluster"] = True
        return make_app(limit=limit, semaphore_redis_url=gates_cluster.url(url_form), **conf)

    return make


@pytest.fixture
def client(gates_cluster: LocalCluster) -> Iterator[RedisCluster]:
    """A cluster client of the test's own."""
    c = gates_cluster.client()
    yield c
    c.close()


def cluster_keys(client: RedisCluster, prefix: str) -> list[str]:
    """Every key under ``prefix`` on every master, but the tick's index (see test 4)."""
    index = index_key(prefix)
    return sorted(
        k.decode()
        for k in client.scan_iter(match=f"{{{prefix}:*", count=1000)
        if k.decode() != index
    )


def tag(prefix: str, group: str) -> str:
    return f"{{{prefix}:{group}}}"


def spread(client: RedisCluster, prefix: str, stem: str, count: int = 3) -> list[str]:
    """Group names ``<stem><i>`` whose hash tags land on ``count`` different masters."""
    by_node: dict[str, str] = {}
    for i in range(500):
        name = f"{stem}{i}"
        by_node.setdefault(client.get_node_from_key(tag(prefix, name)).name, name)
        if len(by_node) == count:
            return list(by_node.values())
    raise AssertionError(f"no {count} names of {stem!r} on different masters")


def masters_of(client: RedisCluster, prefix: str, groups: list[str]) -> dict[str, str]:
    """``{group: the master that serves it}``, the slot checked against ``CLUSTER KEYSLOT``."""
    found = {}
    for group in groups:
        key = keys_for(prefix, group)[0]
        node = client.get_node_from_key(key)
        assert int(client.cluster_keyslot(key)) == client.keyslot(key)
        found[group] = node.name
    return found


def starts(app: Celery) -> collections.Counter[str]:
    """How many times each call's body ran (tests/proj.py's probe log)."""
    probe = app.probe  # type: ignore[attr-defined]
    lines = [raw.decode().split() for raw in probe.client.lrange(probe.key("log"), 0, -1)]
    return collections.Counter(parts[1] for parts in lines if parts[0] == "start")


# -- (1) the core end-to-end test ---------------------------------------------------------


# redis+cluster://h1:p1,h2:p2, redis+cluster://h:p, redis://h:p with semaphore_redis_cluster.
@pytest.mark.parametrize("url_form", ["seeds", "seed", "node"])
def test_forty_calls_through_a_gate_of_three_on_a_cluster_run_three_at_once_and_each_once(
    cluster_app: Callable[..., Celery], client: RedisCluster, prefix: str, url_form: str
) -> None:
    app = cluster_app(limit=3, url_form=url_form)
    rt = runtime_for(app)
    assert isinstance(rt.client, RedisCluster)
    with threads_worker(app, concurrency=8):
        results = [app.tasks["proj.work"].delay(50) for _ in range(40)]
        assert [r.get(timeout=60) for r in results] == [50] * 40
    assert app.probe.value("peak") == 3
    assert app.probe.value("done") == 40
    assert starts(app) == dict.fromkeys((r.id for r in results), 1)
    gate = rt.group("work")
    assert (gate.used("work"), gate.held(), gate.parked()) == (0, 0, 0)
    assert cluster_keys(client, prefix) == at_rest(prefix, "work")


def test_a_cluster_whose_seed_nodes_do_not_answer_fails_a_call_with_redis_unavailable(
    make_app: Callable[..., Celery],
) -> None:
    # redis-py raises RedisClusterException, outside its RedisError tree, when no seed node
    # answers (a new process, or a prefork child, whose listed nodes are down).
    dead = f"127.0.0.1:{free_port()}"
    app = make_app(limit=1, semaphore_redis_url=f"redis+cluster://{dead}")
    with pytest.raises(RedisUnavailable, match=re.escape(dead)):
        app.tasks["proj.work"].delay(1)


# -- (2) stacked gates, groups on several masters -------------------------------------------


def test_stacked_gates_on_a_cluster_each_reach_their_limit_with_groups_on_several_masters(
    cluster_app: Callable[..., Celery],
    client: RedisCluster,
    gates_cluster: LocalCluster,
    prefix: str,
) -> None:
    app = cluster_app()
    groups = spread(client, prefix, "g")
    limits = {f"{gate}-{g}": n for g in groups for gate, n in (("api", 2), ("db", 1))}
    meter = Meter(limits)
    tasks = []
    for g in groups:
        api, db = f"api-{g}", f"db-{g}"
        until = peaks_reached({api: 2, db: 1})

        def body(n: int, units: dict[str, int], until: Any = until) -> str:
            return meter.run(f"{n}:{','.join(units)}", units, until)

        both = gated(api, limit=2, group=g)(gated(db, limit=1, group=g)(body))
        db_only = gated(db, limit=1, group=g)(body)
        api_only = gated(api, limit=2, group=g)(body)
        for kind, fn in (("both", both), ("db", db_only), ("api", api_only)):
            task = app.task(name=f"{prefix}.{g}.{kind}", shared=False)(fn)
            units = {api: 1, db: 1} if kind == "both" else {f"{kind}-{g}": 1}
            tasks.append((task, units))

    results = [task.delay(n, units) for n in range(4) for task, units in tasks]
    rt = runtime_for(app)
    for g in groups:
        # A stacked call that cannot have both gates holds neither.
        group = rt.group(g)
        assert (group.used(f"api-{g}"), group.used(f"db-{g}"), group.held()) == (2, 1, 2)
    with threads_worker(app, concurrency=12):
        assert len({r.get(timeout=60) for r in results}) == len(results) == 36
    assert dict(meter.peak) == limits
    assert meter.over == []
    # Each group lives on the master its hash tag names, and the groups on three of them.
    where = masters_of(client, prefix, groups)
    assert len(set(where.values())) == 3
    for g, name in where.items():
        node = gates_cluster.node(int(name.rsplit(":", 1)[1]))
        with node.client() as direct:
            assert direct.exists(keys_for(prefix, g)[0]) == 1
    assert cluster_keys(client, prefix) == at_rest(prefix, *groups)


# -- (3) a workflow across groups -----------------------------------------------------------


def test_a_workflow_whose_nodes_are_in_gates_on_different_masters_completes_in_order(
    cluster_app: Callable[..., Celery], client: RedisCluster, prefix: str
) -> None:
    app = cluster_app()
    probe = app.probe  # type: ignore[attr-defined]
    gates = spread(client, prefix, "step")

    def mark(what: str, task_id: str) -> None:
        probe.client.rpush(probe.key("events"), f"{what} {task_id} {time.time():.6f}")

    def make(gate: str) -> Any:
        @gated(gate, limit=1)
        @app.task(name=f"{prefix}.{gate}", bind=True, shared=False)
        def step(self: Any, *inputs: Any) -> str:
            mark("start", self.request.id)
            time.sleep(0.02)
            mark("end", self.request.id)
            return "/".join([*map(str, inputs), gate])

        return step

    first, second, third = (make(g) for g in gates)
    wf = Workflow(app)
    a = wf.add(first.s("x"))
    b = wf.add(second.s(), requires=[a])
    c = wf.add(third.s(), requires=[b])
    run = wf.apply_async()
    rt = runtime_for(app)
    assert rt.group(gates[2]).record(c.id)["status"] == "WAITING"
    with threads_worker(app):
        values = run.get(timeout=30)
    assert values[c] == f"x/{gates[0]}/{gates[1]}/{gates[2]}"
    seen: dict[str, dict[str, float]] = {}
    for raw in probe.client.lrange(probe.key("events"), 0, -1):
        what, task_id, at = raw.decode().split()
        seen.setdefault(task_id, {})[what] = float(at)
    assert seen[a.id]["end"] <= seen[b.id]["start"]
    assert seen[b.id]["end"] <= seen[c.id]["start"]
    assert len(set(masters_of(client, prefix, gates).values())) == 3
    # Every notice from one group to the next was counted there and acknowledged here.
    for g in gates:
        group = rt.group(g)
        assert (group.client.zcard(group.keys["outbox"]), group.held(), group.parked()) == (0, 0, 0)


# -- (4) the tick ---------------------------------------------------------------------------


def test_the_tick_on_a_cluster_reclaims_a_vanished_holder_and_empties_its_index_when_idle(
    cluster_app: Callable[..., Celery], client: RedisCluster, prefix: str
) -> None:
    # dropped_after: how long a reclaimed call may still deliver a result; until then the
    # group has something due (the verdict on the vanished call).
    app = cluster_app(limit=1, semaphore_lease=1.0, semaphore_dropped_after=1.0)
    rt = runtime_for(app)
    gate = rt.group("work")
    index = index_key(prefix)
    vanished = f"vanished-{prefix}"
    # A holder whose worker vanished: granted with a 1 s lease, never renewed nor released.
    assert acquire(gate, vanished, b"", lease_s=1.0)[0] is Acquired.GRANTED
    deadline_ms = gate.holders()[vanished]
    # The script told the client (a Due follow-up), which wrote the index on its own slot;
    # the index outlives its latest entry by GRACE_S.
    assert client.zscore(index, tag(prefix, "work")) == deadline_ms
    assert GRACE_S * 1000 - 5_000 < client.pttl(index) <= (GRACE_S + 1) * 1000
    parked = app.tasks["proj.work"].delay(5)
    assert gate.parked() == 1
    with threads_worker(app, concurrency=2):
        wait_for(lambda: now_ms(client) > deadline_ms, 5, "the lease to end")
        assert run_tick(rt)["work"]["timed_out"] == 1
        assert vanished not in gate.holders()
        assert parked.get(timeout=20) == 5
    assert (gate.held(), gate.parked(), gate.used("work")) == (0, 0, 0)
    # Idle now: once the last lease and dropped_after passed, a tick takes the group out of
    # the index (and records the vanished call as dropped).
    wait_for(
        lambda: run_tick(rt) is not None and client.zcard(index) == 0,
        10,
        "the tick's index to be empty",
    )
    assert isinstance(app.AsyncResult(vanished).result, CallDropped)
    assert cluster_keys(client, prefix) == at_rest(prefix, "work")


def now_ms(client: RedisCluster) -> int:
    sec, usec = client.time()
    return int(sec) * 1000 + int(usec) // 1000


# -- the setting that closes the window ------------------------------------------------------


def test_with_wait_replicas_a_submit_whose_grant_did_not_reach_the_replica_is_not_accepted(
    cluster_app: Callable[..., Celery], gates_cluster: LocalCluster, prefix: str
) -> None:
    app = cluster_app(limit=1, semaphore_redis_wait_replicas=1, semaphore_redis_timeout=1.0)
    gate = runtime_for(app).group("work")
    master = gates_cluster.master_of(gate.keys["state"])
    replica = gates_cluster.replica_of(master)
    gates_cluster.cut_replication(master, replica)
    try:
        with pytest.raises(AcceptanceUnknown):
            app.tasks["proj.work"].delay(5)
    finally:
        gates_cluster.mend_replication(replica)
        gates_cluster.wait_ok()


# -- (5) a chaos soak with a failover -------------------------------------------------------

SOAK_LIMIT = 2
#: The long call's lease, renewed last at its start LAST_S before the kill, must outlast the
#: failover (about 2.5 s) and the first keepalive after it (a third of the lease): 6 - 0.3 > 2.5
#: + 2. Then it keeps its slot through the failover.
SOAK_LEASE_S = 6.0
SOAK_TICK_S = 0.5
#: Calls are streamed this long before the kill, and this long after the replica took over.
SOAK_BEFORE_S = 2.5
SOAK_AFTER_S = 2.5
#: The last calls before the kill are sent this long before it (in the lagging variant, after
#: the replica's link was cut): one LONG_MS call that outlives the failover and four short.
LAST_S = 0.3
LONG_MS = 5000
#: How long after the promotion a grant the old master lost may still run beside the new
#: master's: the long call, plus a margin.
WINDOW_S = LONG_MS / 1000 + 1.0


class Stream:
    """Sends ``fault.sleep`` calls of 20-80 ms every 20 ms from a thread until stopped; keeps,
    per call, whether the send was accepted (its result) or refused (the exception raised),
    when it was sent and how long the send took."""

    def __init__(self, task: Any, seed: int = 14) -> None:
        self.task = task
        self.rng = random.Random(seed)
        self.accepted: list[tuple[Any, float, float]] = []
        #: (exception class, message, sent at, took s): kept without the exception itself,
        #: whose traceback would hold this object (and every result) in a reference cycle.
        self.refused: list[tuple[type[BaseException], str, float, float]] = []
        self.go = threading.Event()
        self.go.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self.go.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.go.wait()
            ms = self.rng.randint(20, 80)
            began = time.time()
            try:
                result = self.task.delay(ms)
            except Exception as exc:  # classified by the test: only the package's may come
                self.refused.append((type(exc), str(exc), began, time.time() - began))
            else:
                self.accepted.append((result, began, time.time() - began))
            time.sleep(0.02)


def over_limit(runs: list[Any], limit: int) -> tuple[int, list[tuple[float, float]], set[str]]:
    """The peak, the spans when more than ``limit`` runs were in progress, and the calls that
    ran in those spans."""
    points = sorted(
        [(r.start, 1, i) for i, r in enumerate(runs)] + [(r.end, -1, i) for i, r in enumerate(runs)]
    )
    peak, live, spans, calls = 0, set(), [], set()
    since: float | None = None
    for at, step, i in points:
        if step > 0:
            live.add(i)
        else:
            live.discard(i)
        peak = max(peak, len(live))
        if len(live) > limit:
            since = at if since is None else since
            calls.update(runs[j].task_id for j in live)
        elif since is not None:
            spans.append((since, at))
            since = None
    return peak, spans, calls


@dataclasses.dataclass
class Failover:
    """What a failover soak saw, in plain values (no result object outlives the scenario)."""

    killed_at: float
    promoted_at: float
    sent_s: float
    #: call id -> (final state, its result as text); ``("PARKED", "")`` for a call that never
    #: ended. The LONG_MS call first, then the short ones sent with it, then the stream's.
    calls: dict[str, tuple[str, str]]
    #: The calls the old master alone knew (accepted after ``last_at``, before the kill).
    unreplicated: set[str]
    refused: list[tuple[type[BaseException], str, float, float]]
    sends: list[tuple[float, float]]  # (sent at, the send took s) of every streamed send
    runs: list[Any]


def failover_soak(cluster: Any, gates_cluster: LocalCluster, lagging: bool) -> Failover:
    """Stream calls, send the last ones (a LONG_MS call and four short), SIGKILL the master of
    the gate's slot LAST_S later (after cutting its replica's link when ``lagging``), wait
    for the promotion, stream on, then wait until everything that can end has ended."""
    cluster.worker("w1", concurrency=4)
    cluster.beat()
    sleep = cluster.app.tasks["fault.sleep"]
    assert sleep.delay(10).get(timeout=20) == 10
    gate = cluster.gate
    master = gates_cluster.master_of(gate.keys["state"])
    replica = gates_cluster.replica_of(master)
    began = time.monotonic()
    with Stream(sleep) as stream:
        time.sleep(SOAK_BEFORE_S)  # the pace of the scenario, not a wait for a state
        stream.go.clear()
        wait_for(lambda: gate.held() == 0 and gate.parked() == 0, 10, "an idle gate")
        if lagging:
            gates_cluster.cut_replication(master, replica)
        last_at = time.time()
        last = [sleep.delay(LONG_MS), *(sleep.delay(20) for _ in range(4))]
        stream.go.set()
        time.sleep(max(0.0, last_at + LAST_S - time.time()))
        killed_at = master.kill()
        if lagging:
            gates_cluster.mend_replication(replica)
        promoted_at = gates_cluster.wait_promoted(replica)
        time.sleep(SOAK_AFTER_S)
    sent_s = time.monotonic() - began
    accepted = [*last, *(r for r, _, _ in stream.accepted)]
    unreplicated = {r.id for r in last} | {
        r.id for r, at, _ in stream.accepted if last_at <= at <= killed_at
    }
    others = [r for r in accepted if not lagging or r.id not in unreplicated]
    wait_for(lambda: all(r.ready() for r in others), 40, "every accepted call to end")
    wait_for(
        lambda: gate.held() == 0 and gate.parked() == 0,
        SOAK_LEASE_S + SOAK_TICK_S + 2.0,
        "every hold to be given back or reclaimed",
    )
    time.sleep(SOAK_TICK_S * 2)  # a call still in Redis would have been sent by now
    calls = {}
    for r in accepted:
        calls[r.id] = (r.state, "" if r.state in ("SUCCESS", "PARKED") else repr(r.result))
        cluster.app.backend.remove_pending_result(r)  # polled, never .get(): let go of it
    sends = [(at, took) for _, at, took in stream.accepted]
    sends += [(at, took) for *_, at, took in stream.refused]
    return Failover(
        killed_at, promoted_at, sent_s, calls, unreplicated, stream.refused, sends, cluster.runs()
    )


@pytest.mark.slow
@pytest.mark.parametrize("lagging", [False, True], ids=["replica-in-sync", "replica-lagging"])
def test_a_failover_of_the_gates_master_loses_no_accepted_call_and_over_admits_only_in_its_window(
    cluster: Any,  # tests/faultkit.py: prefork worker and beat subprocesses
    gates_cluster: LocalCluster,
    capsys: pytest.CaptureFixture[str],
    lagging: bool,
) -> None:
    """SIGKILL the master of the gate's slot under a stream of calls; its replica takes over,
    and the calls go on (same app, same worker, same beat).

    In sync: replication on loopback, as in a healthy deployment; nothing may be lost and the
    limit holds. Lagging: the replica's link is cut LAST_S before the kill (as over a slow
    link), so what the old master accepted in that time is the documented window: its grants
    run beside the new master's, its parked calls are gone. Measured and printed.
    """
    cluster.configure(
        CS_SLOTS=gates_cluster.url("seeds"),
        CS_LIMIT=str(SOAK_LIMIT),
        CS_LEASE=str(SOAK_LEASE_S),
        CS_TICK=str(SOAK_TICK_S),
        CS_REDIS_TIMEOUT="1.0",
    )
    began = time.monotonic()
    try:
        soak = failover_soak(cluster, gates_cluster, lagging)
    finally:
        gates_cluster.heal()
    gc.collect()  # the results, while the result backend still answers
    elapsed = time.monotonic() - began

    killed_at, promoted_at, runs = soak.killed_at, soak.promoted_at, soak.runs
    ran = collections.Counter(r.task_id for r in runs)
    states = collections.Counter(state for state, _ in soak.calls.values())
    lost = [i for i, (state, _) in soak.calls.items() if state not in READY_STATES]
    failed = {i: c for i, c in soak.calls.items() if c[0] in READY_STATES and c[0] != "SUCCESS"}
    refused = collections.Counter(kind.__name__ for kind, *_ in soak.refused)
    peak, spans, over_calls = over_limit(runs, SOAK_LIMIT)
    outage = [took for at, took in soak.sends if killed_at <= at <= promoted_at]
    across = [r for r in runs if r.start < killed_at and r.end > promoted_at]
    twice = [
        f"{r.task_id[:8]} {r.start - killed_at:+.2f}s..{r.end - killed_at:+.2f}s fence {r.fence}"
        for r in runs
        if ran[r.task_id] > 1
    ]
    with capsys.disabled():
        print(
            f"\ncluster failover soak (replica {'lagging' if lagging else 'in sync'}):"
            f" {len(soak.sends) + 5} sends in {soak.sent_s:.1f}s, {len(soak.calls)} accepted"
            f" ({dict(states)}), refused {dict(refused)}; promotion"
            f" {promoted_at - killed_at:.2f}s after the kill, slowest send meanwhile"
            f" {max(outage, default=0):.2f}s; {len(runs)} runs ({len(across)} across the"
            f" failover), {sum(1 for n in ran.values() if n > 1)} calls ran twice; peak {peak}"
            f" (limit {SOAK_LIMIT}), over the limit "
            + (
                f"from {spans[0][0] - killed_at:+.2f}s to {spans[-1][1] - killed_at:+.2f}s after"
                f" the kill ({sum(b - a for a, b in spans):.2f}s in all), {len(over_calls)}"
                " calls involved"
                if spans
                else "never"
            )
            + f"; calls lost {len(lost)} (accepted in the last {LAST_S}s:"
            + f" {len(soak.unreplicated)}); whole test {elapsed:.1f}s"
            + (f"\n  runs of the calls that ran twice (from the kill): {twice}" if twice else "")
        )
    # Refused: the submitter was told so, clearly. Accepted: it ran and succeeded, unless the
    # old master alone knew it.
    assert [(k, m) for k, m, _, _ in soak.refused if not issubclass(k, RedisUnavailable)] == []
    assert failed == {}
    assert [i for i in soak.calls if i not in lost and ran[i] == 0] == []
    assert peak_overlap([r for r in runs if r.end <= killed_at]) == SOAK_LIMIT
    long_call = next(iter(soak.calls))
    assert [r.task_id for r in across] == [long_call]
    if not lagging:
        assert (peak, spans, lost) == (SOAK_LIMIT, [], [])
    else:
        # The old master's grant of the long call ran beside the new master's grants, after
        # the kill and no longer than the call; what the old master alone had parked is gone.
        assert peak == SOAK_LIMIT + 1
        assert all(killed_at <= a and b <= promoted_at + WINDOW_S for a, b in spans), spans
        assert set(lost) <= soak.unreplicated
    assert elapsed < 60
