"""Fault tolerance (issue 4): crashes, kills, duplicates and a Redis outage, each with real
``celery worker -P prefork`` subprocesses (``tests.faultproj``) and the private redis-server.

Every test uses a 1-2 s lease and a 0.5 s tick, and asserts the invariants of the issue
exactly: the recorded runs never overlap beyond the limit (a killed run ends when its process
died), a dead holder's slot comes back within lease + tick, every accepted call ends in a
final state, and the gate ends at rest. Tests without a beat prove that a slot came back
through Celery's signals alone: nothing else could have freed it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis
from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import states
from celery.exceptions import SoftTimeLimitExceeded
from celery.result import AsyncResult

from celery_semaphore import CallDropped, RedisUnavailable
from celery_semaphore.group import Acquired

from .conftest import LAYOUT, ROOT, acquire, slot_keys, wait_for
from .faultkit import Cluster, PersistentRedis, Worker, cluster_fixture, peak_overlap  # noqa: F401

#: Seconds beat, the broker and a worker take to send, deliver and run one tick.
MARGIN = 1.0

pytestmark = pytest.mark.slow


@pytest.fixture(params=["plain", "keyed"])
def gate_shape(request: pytest.FixtureRequest) -> str:
    """Every fault test runs with the plain gate, and with ``work`` keyed, weighted and stacked
    with ``aux`` in one group (limits equal to the plain one, so the expected order holds)."""
    return str(request.param)


# -- helpers ---------------------------------------------------------------------------------


def call(cluster: Cluster, task: str, *args: object, **options: object) -> AsyncResult:
    return cluster.app.tasks[f"fault.{task}"].apply_async(args, **options)  # type: ignore[no-any-return]


def flag() -> str:
    return uuid.uuid4().hex[:8]


def ended(result: AsyncResult, timeout: float, what: str) -> AsyncResult:
    wait_for(result.ready, timeout, what)
    return result


def reclaim_window(cluster: Cluster) -> float:
    """Invariant 2: a dead holder's slot is back within lease + tick (plus a tick's travel)."""
    return cluster.lease + cluster.tick + MARGIN


def assert_at_rest(cluster: Cluster, slots: redis.Redis, prefix: str, timeout: float) -> None:
    """No slot held, no call parked, and no per-call key left that would never expire."""
    gate = cluster.gate
    wait_for(lambda: gate.held() == 0 and gate.parked() == 0, timeout, "every slot to be free")
    forever = [
        k
        for k in slot_keys(slots, prefix)
        if not k.endswith((":state", ":free")) and slots.ttl(k) < 0
    ]
    assert forever == [], "per-call data left in keys that never expire"


def queued(cluster: Cluster) -> int:
    """Messages waiting in the test's broker queue."""
    with cluster.app.connection_for_write() as conn:
        return int(conn.default_channel.client.llen(cluster.env["CS_QUEUE"]))


def reserved_ids(cluster: Cluster) -> set[str]:
    """Ids of the messages every worker holds without running them yet."""
    found = cluster.app.control.inspect(timeout=0.5).reserved() or {}
    return {r["id"] for requests in found.values() for r in requests}


def worker_running(workers: list[Worker], pid: int) -> Worker:
    """The worker whose pool process ``pid`` is."""
    return next(w for w in workers if pid in w.children())


def start_workers(cluster: Cluster, *names: str, concurrency: int = 2) -> list[Worker]:
    """Start workers side by side and wait until each answers a ping."""
    workers = [cluster.worker(n, concurrency, wait=False) for n in names]
    for w in workers:
        cluster.wait_ready(w)
    return workers


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


# -- a run that ends by itself ---------------------------------------------------------------


def test_a_task_that_raises_fails_and_hands_its_slot_to_the_next_call(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    a = call(cluster, "fail")
    b = call(cluster, "sleep", 50)
    assert cluster.gate.parked() == 1
    cluster.worker("w1")  # no beat: only the failed run's release can hand the slot on
    assert ended(b, 20, "the parked call to run").get() == 50
    assert a.state == states.FAILURE and isinstance(a.result, RuntimeError)
    runs = cluster.runs()
    assert [r.task_id for r in runs] == [a.id, b.id], cluster.probe.events()
    assert peak_overlap(runs) == 1
    assert runs[0].fence < runs[1].fence
    assert_at_rest(cluster, slots, prefix, timeout=2)


def test_a_retry_with_a_countdown_gives_its_slot_to_the_next_call_and_runs_again_after_it(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    a = call(cluster, "retry_once", 100)
    b = call(cluster, "sleep", 300)
    assert cluster.gate.parked() == 1
    cluster.worker("w1")
    assert a.get(timeout=20) == 1
    assert ended(b, 20, "the parked call to run").get() == 300
    runs = cluster.runs()
    # b took the slot during a's countdown (0.3 s); a's retry waited for b, then ran.
    assert [r.task_id for r in runs] == [a.id, b.id, a.id], cluster.probe.events()
    assert runs[0].fence < runs[1].fence < runs[2].fence
    assert peak_overlap(runs) == 1
    assert_at_rest(cluster, slots, prefix, timeout=2)


def test_a_soft_time_limit_fails_the_call_and_hands_its_slot_on(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    a = call(cluster, "soft_limit")
    b = call(cluster, "sleep", 20)
    cluster.worker("w1")
    assert ended(b, 20, "the parked call to run").get() == 20
    assert a.state == states.FAILURE and isinstance(a.result, SoftTimeLimitExceeded)
    runs = cluster.runs()
    assert [r.task_id for r in runs] == [a.id, b.id], cluster.probe.events()
    assert peak_overlap(runs) == 1
    assert_at_rest(cluster, slots, prefix, timeout=2)


def test_a_hard_time_limit_kills_the_run_and_hands_its_slot_on_only_once_it_is_dead(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    a = call(cluster, "hard_limit")
    b = call(cluster, "sleep", 20)
    cluster.worker("w1")
    cluster.watch(cluster.wait_started(a.id)["pid"])
    assert ended(b, 20, "the parked call to run").get() == 20
    assert a.state == states.FAILURE and isinstance(a.result, TimeLimitExceeded)
    runs = cluster.runs()
    assert [r.task_id for r in runs] == [a.id, b.id], cluster.probe.events()
    # a's run ends at its last record, or when b saw its process dead: never after b began.
    assert peak_overlap(runs) == 1
    assert_at_rest(cluster, slots, prefix, timeout=2)


# -- revokes ----------------------------------------------------------------------------------


def test_revoke_with_terminate_hands_the_slot_on_once_and_a_late_second_release_frees_nothing(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    fb = flag()
    a = call(cluster, "hang", flag())
    b = call(cluster, "hang", fb)
    c = call(cluster, "sleep", 20)
    assert cluster.gate.parked() == 2
    cluster.worker("w1", 3)
    pid = cluster.wait_started(a.id)["pid"]
    cluster.watch(pid)
    cluster.app.control.revoke(a.id, terminate=True)
    cluster.wait_started(b.id)
    # task_revoked (main process) and task_postrun(state=None) (the child, if it gets to run
    # it) both release a: once the child is gone both have happened, and b keeps its slot.
    wait_for(lambda: _zombie_or_gone(pid), 10, "the terminated child to die")
    assert list(cluster.gate.holders()) == [b.id]
    assert cluster.started(c.id) is None and cluster.gate.parked() == 1
    cluster.probe.set_flag(fb)
    assert ended(c, 20, "the last call to run").get() == 20
    assert a.state == states.REVOKED
    assert b.get(timeout=5) == "done"
    runs = cluster.runs()
    assert [r.task_id for r in runs] == [a.id, b.id, c.id], cluster.probe.events()
    assert peak_overlap(runs) == 1
    assert_at_rest(cluster, slots, prefix, timeout=2)


def test_revoking_a_dispatched_call_before_it_starts_gives_its_slot_back_and_it_never_runs(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    cluster.configure(CS_LIMIT="2")
    fa = flag()
    a = call(cluster, "hang", fa)
    b = call(cluster, "sleep", 20)  # holds the second slot, waits behind a in the worker
    c = call(cluster, "sleep", 20)
    assert (cluster.gate.held(), cluster.gate.parked()) == (2, 1)
    cluster.worker("w1", 1)
    cluster.wait_started(a.id)

    wait_for(lambda: b.id in reserved_ids(cluster), 10, "the worker to hold the dispatched call")
    cluster.app.control.revoke(b.id)
    cluster.probe.set_flag(fa)
    assert ended(c, 20, "the parked call to run").get() == 20
    assert b.state == states.REVOKED
    assert cluster.count("prerun", b.id) == 0
    assert [r.task_id for r in cluster.runs()] == [a.id, c.id], cluster.probe.events()
    assert_at_rest(cluster, slots, prefix, timeout=2)


# -- a pool child killed mid-task -------------------------------------------------------------


def test_a_child_killed_with_default_acks_fails_its_call_and_hands_its_slot_on_by_task_failure(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    a = call(cluster, "hang", flag())
    b = call(cluster, "sleep", 20)
    cluster.worker("w1")  # no beat: only task_failure(WorkerLostError) can free a's slot
    cluster.kill_pid(cluster.wait_started(a.id)["pid"])
    # Only task_failure can free a's slot here, and Celery's prefork pool may notice a dead
    # child only at its next maintain_pool run (every 5 s, celery/concurrency/asynpool.py).
    celery_notices_within = 5.0
    window = reclaim_window(cluster) + celery_notices_within
    assert ended(b, window, "the killed call's slot to reach b").get() == 20
    assert a.state == states.FAILURE and isinstance(a.result, WorkerLostError)
    runs = cluster.runs()
    assert [r.task_id for r in runs] == [a.id, b.id], cluster.probe.events()
    assert peak_overlap(runs) == 1
    assert_at_rest(cluster, slots, prefix, timeout=2)


def test_a_child_killed_with_acks_late_and_reject_on_worker_lost_runs_again_in_its_own_slot(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    cluster.configure(CS_ACKS_LATE="1", CS_REJECT_ON_LOST="1")
    fa = flag()
    a = call(cluster, "hang", fa)
    b = call(cluster, "sleep", 20)
    cluster.worker("w1")
    cluster.beat()
    cluster.kill_pid(cluster.wait_started(a.id)["pid"])
    cluster.probe.set_flag(fa)
    # The redelivered message (same id, same headers) must run, not be refused as a duplicate.
    assert ended(a, 15, "the redelivered call to end").get() == "done"
    assert ended(b, 15, "the parked call to run").get() == 20
    runs = cluster.runs()
    # Either order is right: the redelivery comes first when Celery requeues before a's lease
    # expires; b comes first when Celery notices the dead child late (maintain_pool, 5 s).
    assert sorted(r.task_id for r in runs) == sorted([a.id, a.id, b.id]), cluster.probe.events()
    assert runs[0].task_id == a.id
    assert peak_overlap(runs) == 1
    assert_at_rest(cluster, slots, prefix, timeout=reclaim_window(cluster))


def test_a_child_killed_with_retry_on_worker_lost_is_retried_in_the_slot_it_held(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    cluster.configure(CS_RETRY_ON_LOST="1")
    fa = flag()
    a = call(cluster, "hang", fa)
    b = call(cluster, "sleep", 20)
    cluster.worker("w1")
    cluster.beat()
    cluster.kill_pid(cluster.wait_started(a.id)["pid"])
    cluster.probe.set_flag(fa)
    assert ended(a, 15, "the retried call to end").get() == "done"
    assert ended(b, 15, "the parked call to run").get() == 20
    runs = cluster.runs()
    order = [r.task_id for r in runs]
    if order == [a.id, a.id, b.id]:
        # Celery published the retry before a's lease expired: it kept a's slot.
        assert runs[0].fence == runs[1].fence < runs[2].fence
    else:
        # Celery noticed the dead child after the lease expired (maintain_pool runs every
        # 5 s): the slot came back (invariant 2), b took it, the retry took a new one.
        assert order == [a.id, b.id, a.id], cluster.probe.events()
        assert runs[0].fence < runs[1].fence < runs[2].fence
    assert peak_overlap(runs) == 1
    assert_at_rest(cluster, slots, prefix, timeout=2)


# -- a whole worker killed, or shut down ------------------------------------------------------


def test_a_worker_killed_mid_task_with_early_acks_frees_its_slot_within_lease_plus_tick(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    workers = start_workers(cluster, "w1", "w2")
    cluster.beat()
    a = call(cluster, "hang", flag())
    b = call(cluster, "sleep", 20)
    assert cluster.gate.parked() == 1
    started = cluster.wait_started(a.id)
    cluster.kill_worker(worker_running(workers, started["pid"]))
    wait_for(lambda: cluster.slot_free_of(a.id), reclaim_window(cluster), "a's slot to come back")
    assert ended(b, 10, "the parked call to run on the other worker").get() == 20
    runs = cluster.runs()
    assert [r.task_id for r in runs] == [a.id, b.id], cluster.probe.events()
    assert peak_overlap(runs) == 1
    assert_at_rest(cluster, slots, prefix, timeout=2)
    # Invariant 3: with early acks the message is gone with the worker (at most once), and
    # the call must still end in a recorded final state ("dropped"), not stay PENDING.
    # After semaphore_dropped_after (1 s here) with no result, the tick records CallDropped.
    wait_for(
        lambda: a.state in states.READY_STATES,
        reclaim_window(cluster) + 1.0,
        f"the lost call to be recorded as ended (it is {a.state})",
    )
    assert isinstance(a.result, CallDropped)


def test_a_worker_killed_mid_task_with_acks_late_frees_its_slot_and_the_call_runs_again(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    # Visibility timeout > lease + tick + a keepalive interval: the redelivery comes after the
    # dead run's lease was reclaimed, so it is not mistaken for a live duplicate.
    cluster.configure(CS_ACKS_LATE="1", CS_VISIBILITY="3")
    workers = start_workers(cluster, "w1", "w2")
    cluster.beat()
    fa = flag()
    a = call(cluster, "hang", fa)
    b = call(cluster, "sleep", 20)
    started = cluster.wait_started(a.id)
    cluster.kill_worker(worker_running(workers, started["pid"]))
    wait_for(lambda: cluster.slot_free_of(a.id), reclaim_window(cluster), "a's slot to come back")
    assert ended(b, 10, "the parked call to run on the other worker").get() == 20
    cluster.probe.set_flag(fa)
    assert ended(a, 20, "kombu to redeliver the call and it to run").get() == "done"
    runs = cluster.runs()
    assert [r.task_id for r in runs] == [a.id, b.id, a.id], cluster.probe.events()
    assert runs[0].killed
    assert peak_overlap(runs) == 1
    assert_at_rest(cluster, slots, prefix, timeout=2)


def test_a_cold_shutdown_with_acks_late_releases_the_slot_and_the_call_runs_again(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    cluster.configure(CS_ACKS_LATE="1")
    workers = start_workers(cluster, "w1", "w2")
    cluster.beat()
    fa = flag()
    a = call(cluster, "hang", fa)
    b = call(cluster, "sleep", 20)
    pid = cluster.wait_started(a.id)["pid"]
    cluster.watch(pid)
    doomed = worker_running(workers, pid)
    os.kill(doomed.pid, signal.SIGQUIT)
    doomed.proc.wait(15)
    cluster.probe.set_flag(fa)
    assert ended(b, 15, "the parked call to run").get() == 20
    assert ended(a, 15, "the restored call to run again").get() == "done"
    runs = cluster.runs()
    assert sorted(r.task_id for r in runs) == sorted([a.id, a.id, b.id]), cluster.probe.events()
    assert peak_overlap(runs) == 1
    assert_at_rest(cluster, slots, prefix, timeout=reclaim_window(cluster))


def test_a_warm_shutdown_lets_the_running_call_finish_and_release_its_slot(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    fa = flag()
    a = call(cluster, "hang", fa)
    b = call(cluster, "sleep", 20)
    w1 = cluster.worker("w1")
    cluster.wait_started(a.id)
    os.kill(w1.pid, signal.SIGTERM)
    wait_for(lambda: "Warm shutdown" in w1.output(), 10, "the worker to begin its warm shutdown")
    cluster.probe.set_flag(fa)
    assert w1.proc.wait(15) == 0
    assert a.get(timeout=5) == "done"
    cluster.worker("w2")  # b was handed a's slot at its end; another worker runs it
    assert ended(b, 15, "the parked call to run").get() == 20
    runs = cluster.runs()
    assert [r.task_id for r in runs] == [a.id, b.id], cluster.probe.events()
    assert not runs[0].killed
    assert peak_overlap(runs) == 1
    assert_at_rest(cluster, slots, prefix, timeout=2)


# -- duplicates and beats ---------------------------------------------------------------------


def test_a_visibility_timeout_shorter_than_the_task_never_runs_the_call_twice_at_once(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    cluster.configure(CS_ACKS_LATE="1", CS_VISIBILITY="1")
    start_workers(cluster, "w1", "w2")
    fa = flag()
    a = call(cluster, "hang", fa)
    b = call(cluster, "sleep", 20)
    cluster.wait_started(a.id)
    wait_for(lambda: cluster.count("prerun", a.id) >= 2, 10, "the broker to deliver a again")
    # The refused copy's task_postrun comes after everything the package did about it; then
    # whatever it sent on (a backup must wait in Redis) has left the queue for a worker.
    wait_for(lambda: cluster.count("postrun", a.id) >= 1, 10, "the copy's run to end")
    wait_for(lambda: queued(cluster) == 0, 5, "the broker queue to drain")
    assert a.id not in reserved_ids(cluster)
    assert cluster.count("start", a.id) == 1, cluster.probe.events()  # the copy never ran ...
    assert list(cluster.gate.holders()) == [a.id]  # ... and took no second slot
    cluster.probe.set_flag(fa)
    assert a.get(timeout=10) == "done"
    assert ended(b, 10, "the parked call to run").get() == 20
    runs = cluster.runs()
    assert [r.task_id for r in runs] == [a.id, b.id], cluster.probe.events()
    assert peak_overlap(runs) == 1
    assert_at_rest(cluster, slots, prefix, timeout=2)


def test_two_beats_at_once_reclaim_and_dispatch_each_call_exactly_once(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    cluster.configure(CS_LIMIT="3")
    gate = cluster.gate
    # Three holders whose worker died before they started: their leases expire unrenewed.
    for i in range(3):
        assert acquire(gate, f"dead-{i}", b"", limit=3, lease_s=2.0)[0] is Acquired.GRANTED
    results = [call(cluster, "sleep", 150) for _ in range(12)]
    assert gate.parked() == 12
    cluster.beat("beat1")
    cluster.beat("beat2")
    cluster.worker("w1", 4)
    assert [r.get(timeout=30) for r in results] == [150] * 12
    for r in results:
        assert (cluster.count("prerun", r.id), cluster.count("start", r.id)) == (1, 1)
    runs = cluster.runs()
    assert peak_overlap(runs) == 3
    assert len({r.fence for r in runs}) == 12
    for name in ("beat1", "beat2"):
        log = (cluster.tmp / f"{name}.log").read_text()
        assert log.count("Sending due task celery_semaphore.tick") >= 2, log
    assert_at_rest(cluster, slots, prefix, timeout=2)


# -- leases and fences ------------------------------------------------------------------------


def test_a_lease_lost_while_its_task_runs_goes_to_a_higher_fence_and_its_late_release_frees_nothing(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    cluster.configure(CS_LEASE="1.0")
    solo_queue = f"{prefix}-solo"
    # The solo pool runs the task in the worker's only thread: no keepalive while it runs.
    solo = cluster.worker("solo", pool="solo", queues=solo_queue, wait=False)
    cluster.worker("w2")
    cluster.wait_ready(solo)
    cluster.beat()
    fa, fb = flag(), flag()
    a = call(cluster, "outlive_lease", fa, queue=solo_queue)
    b = call(cluster, "hang", fb)
    c = call(cluster, "sleep", 20)
    old = cluster.wait_started(a.id)
    new = cluster.wait_started(b.id, timeout=reclaim_window(cluster) + 5)
    assert new["fence"] > old["fence"]
    cluster.probe.set_flag(fa)
    # The old holder can tell: the package answers that its lease is lost.
    assert a.get(timeout=10) == {"fence": old["fence"], "lease_lost": True}
    # A solo worker answers a ping only between tasks: a's release has been tried.
    assert cluster.app.control.ping([solo.host], timeout=5)
    assert list(cluster.gate.holders()) == [b.id]
    assert cluster.started(c.id) is None and cluster.gate.parked() == 1
    cluster.probe.set_flag(fb)
    assert ended(c, 15, "the last call to run").get() == 20
    assert_at_rest(cluster, slots, prefix, timeout=2)


# -- Redis unreachable ------------------------------------------------------------------------


def test_redis_stopped_and_restarted_fails_calls_fast_writes_nothing_and_expiry_repairs_releases(
    cluster: Cluster, prefix: str
) -> None:
    server = PersistentRedis()
    server.start()
    try:
        cluster.configure(CS_SLOTS=server.url, CS_LIMIT="2")
        slots = redis.Redis.from_url(server.url)
        w1 = cluster.worker("w1")
        beat = cluster.beat()
        assert call(cluster, "sleep", 10).get(timeout=20) == 10
        fa = flag()
        a = call(cluster, "hang", fa)
        cluster.wait_started(a.id)
        server.stop()

        began = time.monotonic()
        with pytest.raises(RedisUnavailable, match=str(server.port)):
            call(cluster, "sleep", 10, task_id="during-outage")
        assert time.monotonic() - began < 2.0  # less than semaphore_redis_timeout: no waiting
        assert queued(cluster) == 0  # nothing reached the broker

        # a ends while Redis is down: its release fails (Celery logs it) and is missed.
        cluster.probe.set_flag(fa)
        assert a.get(timeout=10) == "done"
        wait_for(lambda: "RedisUnavailable" in w1.output(), 10, "the missed release to be logged")

        server.start()
        wait_for(lambda: cluster.slot_free_of(a.id), reclaim_window(cluster), "a's lease to expire")
        assert call(cluster, "sleep", 10).get(timeout=20) == 10
        assert w1.alive() and beat.poll() is None
        for key in slot_keys(slots, prefix):
            if slots.type(key) == b"hash":
                assert not slots.hexists(key, "during-outage"), key
            elif slots.type(key) == b"zset":
                assert slots.zscore(key, "during-outage") is None, key
        assert_at_rest(cluster, slots, prefix, timeout=2)
    finally:
        server.close()


# -- a crash between taking a slot and publishing ---------------------------------------------


def _crashing_caller(
    cluster: Cluster, task_id: str, **crash: str
) -> subprocess.CompletedProcess[bytes]:
    """Call fault.sleep from a process that dies (SIGKILL) inside the publish of its message
    (or where ``crash`` says)."""
    script = (
        "from tests import faultproj\n"
        f"faultproj.app.tasks['fault.sleep'].apply_async((10,), task_id={task_id!r})\n"
    )
    env = dict(cluster.env, **(crash or {"CS_CRASH_PUBLISH": "1"}))
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, timeout=60
    )


def test_a_caller_killed_between_taking_a_slot_and_publishing_leaves_a_slot_the_tick_reclaims(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    # The caller publishes (without broker push that window exists; see the next test).
    cluster.configure(CS_BROKER_PUSH="0")
    cluster.probe.set_flag("crash-publish")
    done = _crashing_caller(cluster, "crashed-call")
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert list(cluster.gate.holders()) == ["crashed-call"]  # the slot was taken ...
    assert queued(cluster) == 0  # ... and nothing was published
    b = call(cluster, "sleep", 20)
    assert cluster.gate.parked() == 1
    cluster.worker("w1")
    cluster.beat()
    # The caller never got the call's id back, so no call is owed: the slot comes back.
    assert ended(b, reclaim_window(cluster) + 5, "the tick to reclaim the slot").get() == 20
    assert cluster.count("prerun", "crashed-call") == 0
    assert_at_rest(cluster, slots, prefix, timeout=2)


# Broker push needs the broker in the gates' database: the tests' default layout (see
# conftest.LAYOUT); with CELERY_SEMAPHORE_TEST_LAYOUT=split the caller publishes, and the two
# tests above cover that.
needs_push = pytest.mark.skipif(LAYOUT != "shared", reason="broker push needs the shared layout")


@needs_push
def test_a_caller_killed_right_after_its_submit_script_with_broker_push_loses_nothing(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    # With broker push the grant and the publish are one script: a caller killed the moment
    # that script returned left its call in the broker, and it runs.
    cluster.probe.set_flag("crash-after-script")
    done = _crashing_caller(cluster, "pushed-call", CS_CRASH_AFTER="acquire")
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert list(cluster.gate.holders()) == ["pushed-call"] and queued(cluster) == 1
    cluster.worker("w1")  # no beat: nothing is sent again
    wait_for(lambda: cluster.count("start", "pushed-call") == 1, 20, "the pushed call to run")
    wait_for(lambda: not cluster.gate.holders(), 20, "its release")
    assert cluster.count("prerun", "pushed-call") == 1
    assert_at_rest(cluster, slots, prefix, timeout=2)


@needs_push
def test_a_worker_killed_right_after_its_release_script_with_broker_push_hands_on_at_once(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    # The release script itself put the next call in the broker: the worker that ran it dies
    # the moment it returned, and the next call runs without waiting for a tick.
    cluster.configure(CS_CRASH_AFTER="release")
    fa = flag()
    a = call(cluster, "hang", fa)
    b = call(cluster, "sleep", 20)
    assert cluster.gate.parked() == 1
    cluster.worker("w1")  # no beat
    cluster.wait_started(a.id)
    cluster.probe.set_flag("crash-after-script")
    cluster.probe.set_flag(fa)
    wait_for(lambda: not cluster.probe.flag("crash-after-script"), 10, "the injected crash")
    assert b.get(timeout=min(10.0, reclaim_window(cluster))) == 20
    assert cluster.count("start", b.id) == 1
    assert_at_rest(cluster, slots, prefix, timeout=5)


def holding(client: redis.Redis) -> bool:
    """Whether a worker waits on a call's wake list (it holds a call ahead of its grant)."""
    return any(c.get("cmd") == "blpop" for c in client.client_list())


@needs_push
def test_a_worker_killed_while_it_holds_a_call_ahead_of_its_grant_loses_nothing(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    # Prefetch: b goes to the broker ahead of its grant and a worker holds it (its message
    # acknowledged). That worker dies; b never ran, so it must still run, once.
    cluster.configure(CS_PREFETCH="1")
    a = call(cluster, "hang", flag())
    b = call(cluster, "sleep", 20)
    assert cluster.gate.parked() == 1 and queued(cluster) == 2  # a, and b sent ahead
    w1 = cluster.worker("w1", 2)
    cluster.wait_started(a.id)
    wait_for(lambda: queued(cluster) == 0 and holding(slots), 10, "w1 to hold b")
    cluster.kill_worker(w1)  # a dies running (at most once), b dies held
    cluster.worker("w2", 2)
    cluster.beat()
    assert ended(b, 2 * reclaim_window(cluster) + 10, "b to run after all").get() == 20
    assert cluster.count("start", b.id) == 1
    assert not any(r.task_id == b.id and r.killed for r in cluster.runs())
    assert_at_rest(cluster, slots, prefix, timeout=5)


@needs_push
def test_a_warm_shutdown_is_not_held_up_by_a_call_held_ahead_of_its_grant(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    # a holds the unit in a queue w1 does not consume, so b's turn does not come while w1
    # holds b: a warm shutdown must let b go instead of waiting for its turn.
    cluster.configure(CS_PREFETCH="1")
    elsewhere = f"{cluster.env['CS_QUEUE']}.elsewhere"
    a = call(cluster, "sleep", 20, queue=elsewhere)
    b = call(cluster, "sleep", 20)
    w1 = cluster.worker("w1", 2)
    wait_for(lambda: queued(cluster) == 0 and holding(slots), 10, "w1 to hold b")
    os.kill(w1.pid, signal.SIGTERM)
    assert w1.proc.wait(10) == 0
    assert cluster.count("start", b.id) == 0 and b.state == "PARKED"
    cluster.worker("w2", 2, queues=f"{cluster.env['CS_QUEUE']},{elsewhere}")
    assert ended(b, 20, "b to run once a released the unit").get() == 20
    assert a.get(timeout=5) == 20
    assert [r.task_id for r in cluster.runs()] == [a.id, b.id]
    assert_at_rest(cluster, slots, prefix, timeout=5)


def test_a_worker_killed_between_handing_a_slot_on_and_publishing_republishes_the_call(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    # The worker publishes the next call (without broker push; see the test above).
    cluster.configure(CS_CRASH_PUBLISH="1", CS_BROKER_PUSH="0")
    fa = flag()
    a = call(cluster, "hang", fa)
    b = call(cluster, "sleep", 20)  # accepted: its caller holds b.id
    assert cluster.gate.parked() == 1
    cluster.worker("w1")  # no beat yet
    cluster.wait_started(a.id)
    cluster.probe.set_flag("crash-publish")
    # a ends; its release hands the slot to b, and the child dies publishing b.
    cluster.probe.set_flag(fa)
    wait_for(lambda: not cluster.probe.flag("crash-publish"), 10, "the injected crash")
    assert a.get(timeout=10) == "done"
    assert list(cluster.gate.holders()) == [b.id] and cluster.gate.parked() == 0
    assert queued(cluster) == 0 and cluster.count("prerun", b.id) == 0
    cluster.beat()
    # b's grant expires unstarted; the tick parks it again and publishes it under its id.
    assert ended(b, reclaim_window(cluster) + 5, "b to be republished").get() == 20
    assert cluster.count("start", b.id) == 1
    assert_at_rest(cluster, slots, prefix, timeout=2)
