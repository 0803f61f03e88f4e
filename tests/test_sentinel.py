"""The gates on a Sentinel-watched master with one replica (see tests/sentinelkit.py).

Only the gates' Redis is the Sentinel one; the broker and the result backend stay on the
session's plain redis-server. Replication lag is made observable with ``CLIENT PAUSE WRITE``
on the replica: it keeps answering the sentinels (so it can be promoted) but applies nothing
of the master's stream, and when the master dies it drops what it had not applied.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from benchmarks.sentinel import measure
from celery_semaphore import AcceptanceUnknown, RedisUnavailable, Runtime, runtime_for
from celery_semaphore.connect import connect
from celery_semaphore.group import Acquired, Group, Started
from celery_semaphore.tick import run_tick

from .conftest import acquire, threads_worker, wait_for
from .sentinelkit import Deployment, sentinels_fixture  # noqa: F401

TIMEOUT_S = 1.0
#: How much longer than semaphore_redis_timeout a call may take (scheduling on a busy host).
MARGIN_S = 1.0


@contextlib.contextmanager
def ticking(rt: Runtime, every_s: float = 0.2) -> Iterator[None]:
    """Run the tick in a thread, as beat would; a tick that cannot reach Redis is skipped."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):
                run_tick(rt)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def starts(app: Celery) -> Counter[str]:
    """How many times each call started (the probe's log)."""
    log = app.probe.client.lrange(app.probe.key("log"), 0, -1)  # type: ignore[attr-defined]
    return Counter(e.split()[1] for e in (x.decode() for x in log) if e.startswith("start "))


def test_thirty_calls_through_a_sentinel_master_never_run_more_than_three_at_once(
    make_app: Callable[..., Celery], sentinels: Deployment
) -> None:
    app = make_app(limit=3, semaphore_redis_url=sentinels.url)
    with threads_worker(app, concurrency=8):
        results = [app.tasks["proj.work"].delay(30) for _ in range(30)]
        assert [r.get(timeout=30) for r in results] == [30] * 30
    assert app.probe.value("peak") == 3
    assert starts(app) == Counter({r.id: 1 for r in results})
    # The gate lives on the master Sentinel names, and reached its replica.
    gate = runtime_for(app).group("work")
    wait_for(lambda: gate.held() == 0, 5, "the slots to be free")
    assert sentinels.master.client().exists(gate.keys["state"])
    assert sentinels.sync()
    assert sentinels.replica.client().hget(gate.keys["state"], "work:peak") == b"3"


def test_a_password_protected_deployment_is_reached_and_named_without_its_passwords(
    make_app: Callable[..., Celery], tmp_path: Path
) -> None:
    deployment = Deployment(tmp_path, password="m-secret", sentinel_password="s-secret")
    try:
        deployment.start()
        deployment.ready()
        app = make_app(limit=2, semaphore_redis_url=deployment.url)
        rt = runtime_for(app)
        hosts = ";".join(s.address for s in deployment.sentinels)
        assert rt.url == f"sentinel://{hosts}/mymaster?password=**&sentinel_password=**"
        gate = rt.group("work")
        assert acquire(gate, "first", limit=2)[0] is Acquired.GRANTED
        assert deployment.master.client().exists(gate.keys["state"])
    finally:
        deployment.stop()


@dataclass
class Submits:
    """Calls sent one after another from a thread, each timed."""

    app: Celery
    sent: list[tuple[float, float, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        work = self.app.tasks["proj.work"]
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                outcome: Any = work.delay(30)
            except Exception as exc:  # every kind is counted by the test
                outcome = exc
            self.sent.append((began, time.monotonic() - began, outcome))
            time.sleep(0.02)

    def accepted(self) -> list[Any]:
        return [o for _, _, o in self.sent if not isinstance(o, BaseException)]

    def refused(self) -> list[BaseException]:
        return [o for _, _, o in self.sent if isinstance(o, BaseException)]


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_calls_fail_fast_while_the_master_is_lost_and_run_on_the_promoted_replica(
    make_app: Callable[..., Celery], sentinels: Deployment, fault: str
) -> None:
    """A killed master refuses connections at once; a frozen one (a hung host) answers
    nothing, so each call waits for ``semaphore_redis_timeout`` and then gives up."""
    app = make_app(
        limit=3,
        semaphore_redis_url=sentinels.url,
        semaphore_redis_timeout=TIMEOUT_S,
        semaphore_lease=2,
    )
    rt = runtime_for(app)
    load = Submits(app)
    with threads_worker(app, concurrency=8), ticking(rt):
        sender = threading.Thread(target=load.run, daemon=True)
        sender.start()
        try:
            wait_for(lambda: len(load.accepted()) >= 10, 20, "calls before the kill")
            old = sentinels.kill_master() if fault == "killed" else sentinels.freeze_master()
            killed = time.monotonic()
            sentinels.wait_failover(old)
            promoted = time.monotonic()
            wait_for(
                lambda: sum(t > promoted and not isinstance(o, BaseException)
                            for t, _, o in list(load.sent)) >= 20,
                20,
                "calls accepted by the new master",
            )  # fmt: skip
        finally:
            load.stop.set()
            sender.join()
        accepted = load.accepted()
        assert [r.get(timeout=30) for r in accepted] == [30] * len(accepted)
        assert starts(app) == Counter({r.id: 1 for r in accepted})
        wait_for(lambda: rt.group("work").held() == 0, 10, "the slots to be free")

        # The same app and worker, on the new master: limit 3 holds exactly.
        app.probe.client.delete(app.probe.key("peak"))  # type: ignore[attr-defined]
        after = [app.tasks["proj.work"].delay(30) for _ in range(30)]
        assert [r.get(timeout=30) for r in after] == [30] * 30
        assert app.probe.value("peak") == 3

    refused = load.refused()
    during = [d for t, d, o in load.sent if killed - 0.1 <= t <= promoted]
    print(
        f"\nmaster {fault}, failover in {promoted - killed:.2f} s: {len(refused)} calls refused "
        f"({Counter(type(e).__name__ for e in refused)}), slowest call {max(during):.3f} s, "
        f"{len(accepted)} accepted, each ran once"
    )
    assert refused, "no call was made while there was no master"
    assert all(isinstance(e, RedisUnavailable) for e in refused), refused
    assert max(d for _, d, _ in load.sent) < TIMEOUT_S + MARGIN_S


@dataclass
class Window:
    """What a failover during a replication stall did to a gate of ``limit``."""

    limit: int
    acknowledged: list[str]  # grants the callers were told about, on the old master
    unknown: list[str]  # submits that raised AcceptanceUnknown during the stall
    admitted_after: list[str]  # grants the new master made when asked again

    @property
    def over(self) -> int:
        """Units held beyond the limit by calls that were told they hold one."""
        return len(self.acknowledged) + len(self.admitted_after) - self.limit


def fail_over_during_a_stall(
    make_app: Callable[..., Celery], sentinels: Deployment, wait_replicas: int
) -> Window:
    """Fill a gate of 3 while replication is stalled, kill the master, ask the new one."""
    limit = 3
    app = make_app(
        limit=limit,
        semaphore_redis_url=sentinels.url,
        semaphore_redis_timeout=TIMEOUT_S,
        semaphore_redis_wait_replicas=wait_replicas,
    )
    rt = runtime_for(app)
    gate = rt.group("work")
    window = Window(limit, [], [], [])

    def take(task_id: str) -> None:
        try:
            outcome = acquire(gate, task_id, limit=limit)[0]
        except AcceptanceUnknown:
            window.unknown.append(task_id)
            return
        assert outcome is Acquired.GRANTED
        assert gate.start(task_id, "old-master:1")[0] is Started.RUN
        window.acknowledged.append(task_id)

    take("before")
    assert sentinels.sync()  # "before" is on the replica
    with sentinels.stalled_replication():
        take("stalled-1")
        take("stalled-2")
        old = sentinels.kill_master()
    sentinels.wait_failover(old)
    # Ask the new master with a client that does not wait for replicas (it has none now).
    plain = Group(rt.client, rt.scripts, "work", prefix=rt.settings.key_prefix)
    for i in range(limit + 1):
        task_id = f"after-{i}"
        if acquire(plain, task_id, b"m", limit=limit)[0] is Acquired.GRANTED:
            window.admitted_after.append(task_id)
    assert set(plain.holders()) == {"before", *window.admitted_after}
    return window


def test_without_wait_replicas_grants_made_during_a_replication_stall_are_admitted_twice(
    make_app: Callable[..., Celery], sentinels: Deployment
) -> None:
    window = fail_over_during_a_stall(make_app, sentinels, wait_replicas=0)
    print(f"\nwait_replicas=0: {window}; over-admission {window.over}")
    # The two grants acknowledged during the stall were lost with the master: the new one
    # hands their units out again while the two calls still run. No more than those.
    assert window.acknowledged == ["before", "stalled-1", "stalled-2"]
    assert window.unknown == []
    assert window.admitted_after == ["after-0", "after-1"]
    assert window.over == 2


def test_with_wait_replicas_a_grant_the_replica_missed_is_never_acknowledged_or_admitted_twice(
    make_app: Callable[..., Celery], sentinels: Deployment
) -> None:
    window = fail_over_during_a_stall(make_app, sentinels, wait_replicas=1)
    print(f"\nwait_replicas=1: {window}; over-admission {window.over}")
    # The stalled grants were not acknowledged (AcceptanceUnknown: their callers never sent
    # the calls), so the new master hands out their units once, to calls told about it.
    assert window.acknowledged == ["before"]
    assert window.unknown == ["stalled-1", "stalled-2"]
    assert window.admitted_after == ["after-0", "after-1"]
    assert window.over == 0


def test_a_submit_on_a_master_without_replicas_is_not_acknowledged_until_one_is_back(
    make_app: Callable[..., Celery], sentinels: Deployment
) -> None:
    app = make_app(
        limit=3,
        semaphore_redis_url=sentinels.url,
        semaphore_redis_timeout=TIMEOUT_S,
        semaphore_redis_wait_replicas=1,
    )
    gate = runtime_for(app).group("work")
    sentinels.replica.kill()
    began = time.monotonic()
    with pytest.raises(AcceptanceUnknown):
        acquire(gate, "alone", limit=3)
    assert time.monotonic() - began < TIMEOUT_S + MARGIN_S
    # The master did run the submit: a replica that syncs now receives it.
    sentinels.add_replica()
    # Sent again under the same id, as AcceptanceUnknown says: the grant is found, not doubled
    # (the publisher then publishes a copy and raises DuplicateCall).
    assert acquire(gate, "alone", limit=3)[0] is Acquired.RESENT
    assert acquire(gate, "next", limit=3)[0] is Acquired.GRANTED
    assert set(gate.holders()) == {"alone", "next"}


def test_wait_replicas_costs_one_wait_round_trip_per_script(sentinels: Deployment) -> None:
    """The figures are printed for the README (``python -m benchmarks.sentinel`` measures them
    on a quiet machine); what is asserted is the count of WAITs."""
    stats = sentinels.master.client()
    before = stats.info("commandstats").get("cmdstat_wait", {}).get("calls", 0)
    calls, rounds = 100, 2
    client = connect(sentinels.url, timeout_s=TIMEOUT_S)
    cost = measure(client, calls=calls, rounds=rounds, prefix=f"t{uuid.uuid4().hex[:8]}")
    waits = stats.info("commandstats")["cmdstat_wait"]["calls"] - before
    print("\n" + "\n".join(cost.lines()))
    # acquire, start and release, each followed by one WAIT, only with the setting.
    assert waits == 3 * calls * rounds
