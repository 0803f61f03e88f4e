"""The eleven breaks of issue 8, one test each, with real processes and private Redis servers.

Each test drives ``celery worker -P prefork`` subprocesses of ``tests.faultproj`` (and beat
where the tick matters), stops or stalls a private ``redis-server`` where Redis must fail, and
asserts the guarantee exactly: how many times a call started, the peak overlap against the
limit, the final state every accepted call reaches.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC
from typing import Any

import pytest
import redis
from celery import Celery, states
from celery.result import AsyncResult

from celery_semaphore import (
    AcceptanceUnknown,
    CallDropped,
    ConfigurationError,
    DuplicateCall,
    NeverStarted,
    RedisUnavailable,
    Scheduler,
    cancel,
    gated,
    runtime_for,
)
from celery_semaphore.backends.base import AbstractBackend
from celery_semaphore.backends.tasks import TaskBackend
from celery_semaphore.config import Settings
from celery_semaphore.group import Claimed, Group

from .conftest import ROOT, wait_for
from .faultkit import Cluster, PersistentRedis, Run, cluster_fixture, peak_overlap  # noqa: F401

pytestmark = pytest.mark.slow

#: Seconds beat, the broker and a worker take to send, deliver and run one tick.
MARGIN = 1.0


# -- helpers ---------------------------------------------------------------------------------


def call(cluster: Cluster, task: str, *args: object, **options: object) -> AsyncResult:
    return cluster.app.tasks[f"fault.{task}"].apply_async(args, **options)  # type: ignore[no-any-return]


def flag() -> str:
    return uuid.uuid4().hex[:8]


def state_of(group: Group, task_id: str) -> str | None:
    record = group.record(task_id)
    return None if record is None else str(record.get("state"))


def at_rest(group: Group) -> bool:
    return group.held() == 0 and group.parked() == 0 and group.waiting() == 0


def queued(cluster: Cluster, queue: str | None = None) -> int:
    with cluster.app.connection_for_write() as conn:
        return int(conn.default_channel.client.llen(queue or cluster.env["CS_QUEUE"]))


def reserved_ids(cluster: Cluster) -> set[str]:
    found = cluster.app.control.inspect(timeout=0.5).reserved() or {}
    return {r["id"] for requests in found.values() for r in requests}


def taken_ids(cluster: Cluster) -> set[str]:
    """Ids of the messages every worker runs or holds prefetched."""
    # Replies come from each worker's event loop: give a loaded machine time to answer.
    inspect = cluster.app.control.inspect(timeout=2.0)
    found = {**(inspect.active() or {})}
    for host, requests in (inspect.reserved() or {}).items():
        found[host] = [*found.get(host, []), *requests]
    return {r["id"] for requests in found.values() for r in requests}


def runs_of(cluster: Cluster, ids: set[str]) -> list[Run]:
    return [r for r in cluster.runs() if r.task_id in ids]


def send_from_process(
    cluster: Cluster, count: int, ms: int, **variables: str
) -> tuple[list[str], str]:
    """Send ``count`` calls of fault.sleep from a process configured by ``variables``.

    Returns the calls' ids and what the process logged.
    """
    script = (
        "import logging\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from tests import faultproj\n"
        "task = faultproj.app.tasks['fault.sleep']\n"
        f"print(' '.join(task.delay({ms}).id for _ in range({count})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=dict(cluster.env, **variables),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().split(), done.stderr.decode()


@pytest.fixture
def private_redis() -> Iterator[PersistentRedis]:
    """A redis-server of this test alone for the gates, which the test may stop or stall."""
    server = PersistentRedis()
    server.start()
    try:
        yield server
    finally:
        pid = server_pid(server)
        if pid:
            os.kill(pid, signal.SIGCONT)
        server.close()


def server_pid(server: PersistentRedis) -> int | None:
    process = getattr(server._server, "process", None)
    return process.pid if process is not None and process.poll() is None else None


# -- A. a handed-off call whose start cannot reach Redis -------------------------------------


def test_a_handed_off_call_whose_start_cannot_reach_redis_is_skipped_and_runs_once_from_redis(
    cluster: Cluster, private_redis: PersistentRedis, prefix: str
) -> None:
    cluster.configure(CS_SLOTS=private_redis.url, CS_REDIS_TIMEOUT="0.5")
    later = f"{prefix}-later"
    gate = cluster.gate
    cluster.worker("w1")
    cluster.beat()
    fh = flag()
    holder = call(cluster, "hang", fh)
    x = call(cluster, "sleep", 20, queue=later)  # its worker starts only once Redis is down
    assert state_of(gate, x.id) == "parked"
    cluster.wait_started(holder.id)
    cluster.probe.set_flag(fh)
    assert holder.get(timeout=10) == "done"
    # The holder's release handed the slot to x and published x from Redis.
    wait_for(lambda: queued(cluster, later) == 1, 10, "x to be handed the slot and published")
    assert state_of(gate, x.id) == "granted"
    private_redis.stop()

    w2 = cluster.worker("w2", 1, queues=later)
    wait_for(lambda: cluster.count("postrun", x.id) == 1, 20, "x's delivery to be refused")
    assert cluster.count("start", x.id) == 0  # its start was not recorded: it did not run
    assert "could not be recorded (Redis unreachable); skipped" in w2.output()

    private_redis.start()
    # Its lease expires, and the tick sends it again from its message in Redis.
    assert x.get(timeout=cluster.lease + 10) == 20
    wait_for(lambda: at_rest(gate), 10, "the gate to come to rest")
    assert cluster.count("start", x.id) == 1
    assert x.state == states.SUCCESS


def test_a_retry_of_a_handed_off_call_whose_start_cannot_reach_redis_still_runs(
    cluster: Cluster, private_redis: PersistentRedis, prefix: str
) -> None:
    cluster.configure(CS_SLOTS=private_redis.url, CS_REDIS_TIMEOUT="0.5")
    later = f"{prefix}-later"
    gate = cluster.gate
    cluster.worker("w1")
    cluster.beat()
    fh = flag()
    holder = call(cluster, "hang", fh)
    x = call(cluster, "retry_after", 0, later)
    assert state_of(gate, x.id) == "parked"
    cluster.wait_started(holder.id)
    cluster.probe.set_flag(fh)
    # x is handed the slot (its message carries the hand-off mark), runs, and retries at once
    # keeping its hold, to a queue whose worker starts only once Redis is down: Redis keeps no
    # message of it, so nothing but this retry will run it.
    wait_for(lambda: cluster.count("postrun", x.id) == 1, 10, "x's first run to retry")
    assert [e["state"] for e in cluster.probe.events("postrun") if e["id"] == x.id] == ["RETRY"]
    assert queued(cluster, later) == 1
    private_redis.stop()
    cluster.worker("w2", 1, queues=later)
    assert x.get(timeout=10) == 1
    private_redis.start()
    wait_for(lambda: at_rest(gate), cluster.lease + 10, "the gate to come to rest")
    assert x.state == states.SUCCESS and cluster.count("start", x.id) == 2


def test_a_handed_off_call_whose_start_times_out_in_a_stall_runs_once(
    cluster: Cluster, private_redis: PersistentRedis, prefix: str
) -> None:
    cluster.configure(CS_SLOTS=private_redis.url, CS_REDIS_TIMEOUT="0.5", CS_LEASE="3")
    later = f"{prefix}-later"
    gate = cluster.gate
    cluster.worker("w1")
    w2 = cluster.worker("w2", 1, queues=later)
    cluster.beat()
    assert call(cluster, "sleep", 10, queue=later).get(timeout=10) == 10  # a warm connection
    (child,) = w2.children()
    fh = flag()
    holder = call(cluster, "hang", fh)
    x = call(cluster, "sleep", 20, queue=later)
    cluster.wait_started(holder.id)
    os.kill(child, signal.SIGSTOP)  # x is handed to w2's child, which starts it only later
    cluster.probe.set_flag(fh)
    assert holder.get(timeout=10) == "done"
    wait_for(lambda: x.id in taken_ids(cluster), 30, "w2 to take x")
    pid = server_pid(private_redis)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        # x's start reaches the stalled server and times out: it runs there once resumed.
        os.kill(child, signal.SIGCONT)
        wait_for(lambda: cluster.count("postrun", x.id) == 1, 20, "x's delivery to end")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert x.get(timeout=cluster.lease + 10) == 20
    wait_for(lambda: at_rest(gate), cluster.lease + 10, "the gate to come to rest")
    assert cluster.count("start", x.id) == 1 and x.state == states.SUCCESS


# -- B. a call sent while the gates' Redis stalls -------------------------------------------


def test_a_call_sent_while_redis_stalls_may_be_accepted_and_a_resend_never_runs_it_twice(
    cluster: Cluster, private_redis: PersistentRedis
) -> None:
    cluster.configure(CS_SLOTS=private_redis.url, CS_REDIS_TIMEOUT="0.5", CS_LEASE="10")
    gate = cluster.gate
    fh = flag()
    holder = call(cluster, "hang", fh)  # holds the slot (no worker yet: it waits in the broker)
    before = call(cluster, "sleep", 10)  # parked: this process now sends messages up front
    assert state_of(gate, before.id) == "parked"

    pid = server_pid(private_redis)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(AcceptanceUnknown) as unknown:
            call(cluster, "sleep", 10, task_id="stalled")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert unknown.value.task_id == "stalled"
    assert isinstance(unknown.value, RedisUnavailable)
    # The request sat in the server's buffer and normally ran when the server resumed; the
    # caller sends it again under the same id: refused as a duplicate, or kept now.
    with contextlib.suppress(DuplicateCall):
        call(cluster, "sleep", 10, task_id="stalled")
    assert state_of(gate, "stalled") == "parked"
    with pytest.raises(DuplicateCall):
        call(cluster, "sleep", 10, task_id="stalled")

    # A server that is down refuses at once, and nothing is written.
    private_redis.stop()
    with pytest.raises(RedisUnavailable) as refused:
        call(cluster, "sleep", 10, task_id="refused")
    assert not isinstance(refused.value, AcceptanceUnknown)
    private_redis.start()
    assert gate.record("refused") is None

    cluster.worker("w1")
    cluster.probe.set_flag(fh)
    assert holder.get(timeout=20) == "done"
    assert before.get(timeout=20) == 10
    assert AsyncResult("stalled", app=cluster.app).get(timeout=20) == 10
    wait_for(lambda: at_rest(gate), 10, "the gate to come to rest")
    assert cluster.count("start", "stalled") == 1
    assert cluster.count("prerun", "refused") == 0 and queued(cluster) == 0
    assert AsyncResult("refused", app=cluster.app).state == states.PENDING


def test_a_call_granted_while_redis_stalls_runs_once_when_its_caller_sends_it_again(
    cluster: Cluster, private_redis: PersistentRedis
) -> None:
    cluster.configure(CS_SLOTS=private_redis.url, CS_REDIS_TIMEOUT="0.5")
    gate = cluster.gate
    # A second send of a call granted at its first send: refused, and a copy is published
    # (the first one's message may be lost, as below); one copy runs.
    twice = call(cluster, "sleep", 10, task_id="twice")
    with pytest.raises(DuplicateCall):
        call(cluster, "sleep", 10, task_id="twice")
    assert queued(cluster) == 2
    cluster.worker("w1")
    assert twice.get(timeout=20) == 10
    wait_for(lambda: cluster.count("postrun", "twice") == 2, 10, "the copy to be refused")
    assert cluster.count("start", "twice") == 1

    # The gate is free: the stalled send is granted when the server resumes, but its caller
    # got no answer and published nothing.
    pid = server_pid(private_redis)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(AcceptanceUnknown):
            call(cluster, "sleep", 10, task_id="granted")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert state_of(gate, "granted") == "granted" and queued(cluster) == 0
    with pytest.raises(DuplicateCall):
        call(cluster, "sleep", 10, task_id="granted")
    assert AsyncResult("granted", app=cluster.app).get(timeout=20) == 10
    wait_for(lambda: at_rest(gate), 10, "the gate to come to rest")
    assert cluster.count("start", "granted") == 1


# -- C. a call that can never start ----------------------------------------------------------


def test_a_call_no_worker_consumes_ends_never_started_and_the_calls_behind_it_run(
    cluster: Cluster, prefix: str
) -> None:
    cluster.configure(CS_MAX_DISPATCHES="2")
    nowhere = f"{prefix}-nowhere"
    gate = cluster.gate
    fh = flag()
    holder = call(cluster, "hang", fh)
    stuck = call(cluster, "sleep", 10, queue=nowhere)
    doomed = call(cluster, "sleep", 10, queue=nowhere)  # cancelled once handed the slot
    unreadable = call(cluster, "sleep", 10, serializer="pickle")  # workers accept json only
    behind = [call(cluster, "sleep", 20) for _ in range(5)]
    assert gate.parked() == 8
    cluster.worker("w1")
    cluster.beat()
    cluster.wait_started(holder.id)
    cluster.probe.set_flag(fh)
    assert holder.get(timeout=10) == "done"

    wait_for(lambda: state_of(gate, doomed.id) == "granted", 20, "doomed to be handed the slot")
    assert cancel(doomed, cluster.app) == "granted"
    assert doomed.state == states.REVOKED

    assert [r.get(timeout=30) for r in behind] == [20] * 5
    wait_for(stuck.ready, 30, "the stuck call to be given up")
    # The calls behind it went first while it waited to be sent again.
    last_behind = max(r.end for r in runs_of(cluster, {r.id for r in behind}))
    assert last_behind < stuck.date_done.replace(tzinfo=UTC).timestamp()
    assert stuck.state == states.FAILURE
    exc = stuck.result
    assert isinstance(exc, NeverStarted), exc
    assert (exc.gate, exc.task_id, exc.queue, exc.attempts) == ("work", stuck.id, nowhere, 2)
    wait_for(unreadable.ready, 30, "the unreadable call to be given up")
    exc = unreadable.result
    assert isinstance(exc, NeverStarted), exc
    assert (exc.queue, exc.attempts) == (cluster.env["CS_QUEUE"], 2)
    assert queued(cluster, nowhere) == 3  # two sends of the stuck call, one of the cancelled
    wait_for(lambda: at_rest(gate), 10, "the gate to come to rest")
    assert cluster.count("start", stuck.id) == cluster.count("start", doomed.id) == 0
    assert cluster.count("prerun", unreadable.id) == 0
    # A call in a final state is not cancelled again.
    assert cancel(stuck, cluster.app) == ""


# -- D. countdown calls and granted calls whose worker dies -----------------------------------


def test_a_countdown_call_waits_in_redis_and_runs_after_its_time_when_its_first_worker_died(
    cluster: Cluster,
) -> None:
    gate = cluster.gate
    w1 = cluster.worker("w1")
    sent = time.time()
    result = call(cluster, "sleep", 20, countdown=4)
    dropped = call(cluster, "sleep", 20, countdown=4)
    assert state_of(gate, result.id) == "waiting" and gate.waiting() == 2
    assert cancel(dropped, cluster.app) == "waiting"
    assert dropped.state == states.REVOKED
    assert queued(cluster) == 0 and gate.held() == 0  # no broker, no capacity until due
    cluster.kill_worker(w1)
    w2 = cluster.worker("w2")
    cluster.beat()
    assert result.get(timeout=20) == 20
    start = cluster.started(result.id)
    assert start is not None and start["t"] >= sent + 4.0
    assert start["pid"] in w2.children()
    assert cluster.count("start", result.id) == 1
    wait_for(lambda: at_rest(gate), 10, "the gate to come to rest")
    assert cluster.count("prerun", dropped.id) == 0 and dropped.state == states.REVOKED


def test_a_granted_call_prefetched_by_a_killed_worker_is_recorded_as_dropped(
    cluster: Cluster,
) -> None:
    cluster.configure(CS_LIMIT="2")
    gate = cluster.gate
    w1 = cluster.worker("w1", 1)
    fh = flag()
    running = call(cluster, "hang", fh)
    cluster.wait_started(running.id)
    prefetched = call(cluster, "sleep", 20)  # granted at once, taken by w1 while it is busy
    wait_for(lambda: prefetched.id in reserved_ids(cluster), 10, "w1 to prefetch the call")
    assert state_of(gate, prefetched.id) == "granted"
    cluster.kill_worker(w1)
    cluster.worker("w2")
    cluster.beat()
    window = cluster.lease + cluster.tick + 1.0 + 2 * MARGIN  # dropped_after is 1 s
    for result in (prefetched, running):
        wait_for(result.ready, window + 5, f"call {result.id} to reach a final state")
        assert result.state == states.FAILURE
        assert isinstance(result.result, CallDropped), result.result
        assert result.result.gate == "work"
    assert cluster.count("start", prefetched.id) == 0
    wait_for(lambda: at_rest(gate), 10, "the gate to come to rest")


# -- E. the limit in force lives in Redis ----------------------------------------------------


def test_a_lowered_limit_holds_at_once_and_only_limit_source_config_raises_it_again(
    cluster: Cluster, slots: redis.Redis
) -> None:
    cluster.configure(CS_LIMIT="5", CS_LEASE="5")
    rt = runtime_for(cluster.app)
    assert rt is not None
    gate = rt.group("work")
    cluster.worker("w1", 5)
    first = [call(cluster, "sleep", 200) for _ in range(20)]
    assert gate.limit("work") == 5
    wait_for(lambda: len(cluster.probe.events("start")) >= 3, 20, "the first calls to run")
    old, grants = gate.resize("work", 2)
    rt.dispatch("work", grants)
    assert old == 5 and not grants
    resized_at = int(slots.hget(gate.keys["state"], "fence") or 0)

    # A producer process still configured with 5 does not bring the old limit back.
    second, logged = send_from_process(cluster, 20, 200)
    assert "configured with limit 5 here, but the limit in force (stored in Redis) is 2" in logged
    ids = {r.id for r in first} | set(second)
    wait_for(lambda: all(cluster.started(i) for i in second), 60, "every call to run")
    assert [r.get(timeout=20) for r in first] == [200] * 20
    for task_id in second:
        assert AsyncResult(task_id, app=cluster.app).get(timeout=20) == 200
    assert gate.limit("work") == 2
    runs = runs_of(cluster, ids)
    assert len(runs) == 40
    # From the first run granted after the resize on, at most 2 run at once.
    effective = min(r.start for r in runs if r.fence > resized_at)
    after = [
        Run(r.task_id, r.pid, max(r.start, effective), r.end, r.fence, r.killed)
        for r in runs
        if r.end > effective
    ]
    assert peak_overlap(after) == 2, (resized_at, effective, runs)

    # With semaphore_limit_source = 'config', a process's configuration does change it.
    before = {r.task_id for r in cluster.runs()}
    third, _ = send_from_process(cluster, 15, 300, CS_LIMIT_SOURCE="config")
    for task_id in third:
        assert AsyncResult(task_id, app=cluster.app).get(timeout=20) == 300
    assert gate.limit("work") == 5
    assert peak_overlap([r for r in cluster.runs() if r.task_id not in before]) == 5
    wait_for(lambda: at_rest(gate), 10, "the gate to come to rest")


# -- F. validation at decoration -------------------------------------------------------------


@pytest.mark.parametrize("lease", [math.nan, math.inf, -math.inf, 0.0004, 0.999])
def test_a_lease_that_is_not_finite_or_under_a_second_is_refused_at_decoration(
    lease: float,
) -> None:
    with pytest.raises(ConfigurationError, match=r"@gated\('api'\): lease must be a finite"):
        gated("api", limit=2, lease=lease)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"limit": math.nan}, ConfigurationError, "the limit of gate 'api'"),
        ({"limit": 2.0}, ConfigurationError, "the limit of gate 'api'"),
        ({"priority": math.nan}, ConfigurationError, "priority must be an int"),
        ({"weight": math.inf}, TypeError, "gate 'api': weight"),
        ({"key": str, "key_limit": math.nan}, ConfigurationError, "the key_limit of gate 'api'"),
        ({"group": "a{b}"}, ConfigurationError, "group must be a non-empty string without"),
    ],
)
def test_every_other_bad_number_or_name_is_refused_at_decoration_naming_its_option(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        gated("api", **{"limit": 2, **options})


@pytest.mark.parametrize("lease", [math.nan, math.inf, 0.0004])
def test_a_lease_setting_that_is_not_finite_or_under_a_second_is_refused(lease: float) -> None:
    app = Celery("breaks-f", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.semaphore_lease = lease
    with pytest.raises(ConfigurationError, match="semaphore_lease must be a finite"):
        Settings.from_conf(app.conf)


def test_a_bare_gated_on_a_task_named_with_braces_is_refused_at_decoration() -> None:
    app = Celery("breaks-f", broker="redis://127.0.0.1:1/0", set_as_current=False)
    with pytest.raises(ConfigurationError, match=r"the gate name of tasks\.\{x\}"):

        @gated
        @app.task(name="tasks.{x}", shared=False)
        def braces() -> None: ...


# -- G. two schedulers polling a stale store -------------------------------------------------


class StaleStore:
    """Ids a replica keeps handing out after they started: every poll may be stale."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.started: list[str] = []
        self.stale_polls = 0
        self.lock = threading.Lock()


class StaleReplica(AbstractBackend):
    """Cycles through every id of the store, started or not (a replica that lags)."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.turn = 0

    def poll(self) -> str | None:
        store: StaleStore = self.context["store"]
        with store.lock:
            task_id = store.ids[self.turn % len(store.ids)]
            self.turn += 1
            store.stale_polls += task_id in store.started
            return task_id

    def start_callback(self, task_id: str) -> None:
        store: StaleStore = self.context["store"]
        with store.lock:
            store.started.append(task_id)


def test_two_schedulers_polling_stale_ids_start_each_id_exactly_once(
    slots: redis.Redis, prefix: str
) -> None:
    store = StaleStore([f"t{i}" for i in range(30)])
    configs = [
        {"slot_id": n, "backends": [StaleReplica], "slot_cls": "RedisSlot", "timeout": 30}
        for n in (1, 2, 3)
    ]
    schedulers = [
        Scheduler({"redis_c": slots, "store": store}, prefix=prefix).load(configs) for _ in range(2)
    ]
    done = threading.Event()

    def run(scheduler: Scheduler) -> None:
        group = scheduler.group_of("slots")
        assert group is not None
        while not done.is_set():
            scheduler.schedule()
            for task_id in group.slots("slots").values():
                scheduler.stop(task_id)

    threads = [threading.Thread(target=run, args=(s,)) for s in schedulers]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(set(store.started)) == 30, 30, "every id to start")
        # Rounds after the last id started: each of them polls only ids that already ended.
        polls = store.stale_polls
        wait_for(lambda: store.stale_polls > polls + 200, 30, "more rounds of stale polls")
    finally:
        done.set()
        for t in threads:
            t.join()
    assert sorted(store.started) == sorted(store.ids)  # each exactly once


# -- H. a task a scheduler slot started, delivered twice -------------------------------------


class SlotJobs(TaskBackend):
    """Hands out the ids of the context's list; each runs as ``fault.job(id)``."""

    task_name = "fault.job"

    def poll(self) -> str | None:
        todo: list[str] = self.context["todo"]
        return todo[0] if todo else None

    def mark_started(self, task_id: str) -> None:
        self.context["todo"].remove(task_id)


def test_a_task_started_by_a_scheduler_slot_and_delivered_twice_runs_once(
    cluster: Cluster,
) -> None:
    rt = runtime_for(cluster.app)
    assert rt is not None
    job_id = f"job-{flag()}"  # fault.job(flag) runs until its flag is set: the id is the flag
    scheduler = Scheduler(
        {"app": cluster.app, "redis_c": rt.client, "todo": [job_id]},
        prefix=rt.settings.key_prefix,
        group_factory=rt.group,
    ).load([{"slot_id": 1, "backends": [SlotJobs], "slot_cls": "RedisSlot", "semaphore": "jobs"}])
    group = rt.group("jobs")
    cluster.worker("w1", 2)
    assert scheduler.schedule()["jobs"]["started"] == 1
    first = cluster.wait_started(job_id)

    # The same message again (a redelivery) while the first run goes on.
    headers = {"semaphore_gate": "jobs", "semaphore_gates": "jobs"}
    cluster.app.signature("fault.job", args=(job_id,)).apply_async(task_id=job_id, headers=headers)
    wait_for(lambda: cluster.count("postrun", job_id) == 1, 20, "the second delivery to end")
    assert cluster.count("start", job_id) == 1 and cluster.count("end", job_id) == 0

    cluster.probe.set_flag(job_id)
    assert AsyncResult(job_id, app=cluster.app).get(timeout=20) == "done"
    wait_for(lambda: group.held() == 0, 10, "the slot to be free")
    wait_for(lambda: queued(cluster) == 0 and not reserved_ids(cluster), 10, "no copy left")
    assert cluster.count("start", job_id) == 1
    assert cluster.count("prerun", job_id) == 2
    assert first["fence"] > 0

    # A copy that arrives after its slot timed out (the backend was told) holds nothing: it is
    # skipped, not sent round again.
    late_id = f"job-{flag()}"
    outcome, _ = group.claim("jobs", "1", late_id, "SlotJobs", lease_ms=1000, limit=1)
    assert outcome is Claimed.CLAIMED
    wait_for(lambda: scheduler.schedule()["jobs"]["timed_out"] == 1, 10, "the slot to time out")
    cluster.app.signature("fault.job", args=(late_id,)).apply_async(
        task_id=late_id, headers=headers
    )
    wait_for(lambda: cluster.count("postrun", late_id) == 1, 20, "the late copy to be skipped")
    wait_for(lambda: queued(cluster) == 0 and not reserved_ids(cluster), 10, "no copy left")
    assert cluster.count("prerun", late_id) == 1 and cluster.count("start", late_id) == 0


# -- I. Task.replace -------------------------------------------------------------------------


def test_a_gated_task_that_replaces_itself_finishes_as_in_plain_celery(cluster: Cluster) -> None:
    gate = cluster.gate
    cluster.worker("w1", 2)
    for name in ("nest", "nest_chain", "nest_group"):
        plain = call(cluster, f"{name}_plain", 3).get(timeout=20)
        result = call(cluster, name, 3)
        assert result.get(timeout=20) == plain, name
        assert result.state == states.SUCCESS
    assert call(cluster, "nest", 3).get(timeout=20) == [3, 2, 1, 0]
    assert call(cluster, "nest_chain", 3).get(timeout=20) == [3, 2, 1, 0, "c1", "c2", "c3"]
    assert call(cluster, "nest_group", 3).get(timeout=20) == [[[[0], [1, "g"]], [2, "g"]], [3, "g"]]
    wait_for(lambda: at_rest(gate), 10, "the gate to come to rest")
    runs = [r for r in cluster.runs() if r.fence]
    assert peak_overlap(runs) == 1


# -- J. the same task id sent twice ----------------------------------------------------------


def test_a_second_send_of_a_frozen_signature_raises_duplicate_call_and_the_call_runs_once(
    cluster: Cluster,
) -> None:
    gate = cluster.gate
    cluster.worker("w1")
    fh = flag()
    holder = call(cluster, "hang", fh)
    cluster.wait_started(holder.id)
    sig = cluster.app.tasks["fault.sleep"].s(10)
    sig.freeze()
    first = sig.apply_async()
    assert state_of(gate, first.id) == "parked"
    with pytest.raises(DuplicateCall) as dup:
        sig.apply_async()
    assert dup.value.task_id == first.id
    cluster.probe.set_flag(fh)
    assert first.get(timeout=20) == 10
    wait_for(lambda: at_rest(gate), 10, "the gate to come to rest")
    assert cluster.count("start", first.id) == 1


# -- K. a gate below @app.task, its limit only in the decorator --------------------------------


def test_a_gate_with_its_limit_only_in_the_decorator_holds_in_prefork_children_both_placements(
    cluster: Cluster,
) -> None:
    cluster.configure(CS_BETA="1")
    worker = cluster.worker("w1", 4)
    began = time.monotonic()
    results = [call(cluster, "beta_below", 50) for _ in range(40)]
    results += [call(cluster, "beta_above", 50) for _ in range(20)]
    assert [r.get(timeout=30) for r in results] == [50] * 60
    took = time.monotonic() - began
    runs = runs_of(cluster, {r.id for r in results})
    assert len(runs) == 60
    assert peak_overlap(runs) == 2
    assert took < 10, f"60 calls of 50 ms through a gate of 2 took {took:.1f} s"
    assert "ConfigurationError" not in worker.output()
    beta = runtime_for(cluster.app).group("beta")  # type: ignore[union-attr]
    assert beta.limit("beta") == 2
    wait_for(lambda: at_rest(beta), 10, "the gate to come to rest")
