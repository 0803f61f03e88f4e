"""Broker push: where the broker is the gates' Redis, the granting script queues the message.

Real parts: a private redis-server, an in-process threads worker that consumes what the
scripts pushed, and MONITOR to see which client wrote each message into the queue.
"""

from __future__ import annotations

import pytest
import redis
from kombu import Queue
from kombu.serialization import loads

from celery_semaphore import Workflow, runtime_for
from celery_semaphore.message import Envelope

from .conftest import push_app, queued_messages, threads_worker, wait_for


def test_a_grant_queues_the_message_in_its_own_script_and_a_real_worker_runs_it(
    urls: dict[str, str], prefix: str, slots: redis.Redis, lpushes: list[tuple[str, str]]
) -> None:
    app = push_app(urls, prefix, "slots", limit=1)
    rt = runtime_for(app)
    assert rt is not None and rt.broker_push
    work = app.tasks["proj.work"]
    first = work.delay(10)
    # Priorities go to kombu's priority lists, which the script writes as kombu would.
    rest = [work.apply_async((10,), priority=p) for p in (0, 5, 9)]
    gate = rt.group("work")
    assert (gate.held(), gate.parked()) == (1, 3)
    queued = queued_messages(slots, prefix)
    assert [m["headers"]["id"] for m in queued] == [first.id]
    # Pushed at its submit: not a hand-off.
    assert queued[0]["headers"]["semaphore_handoff"] == "0"
    with threads_worker(app, concurrency=4):
        assert [r.get(timeout=20) for r in [first, *rest]] == [10] * 4
    assert app.probe.value("peak") == 1
    wait_for(lambda: len(lpushes) >= 4, 5, "MONITOR to see every push")
    # Every message reached the broker from inside a script: nobody published one.
    assert [client for client, _ in lpushes] == ["lua"] * 4
    # MONITOR shows the priority separator escaped.
    lists = {prefix, f"{prefix}\\x06\\x163", f"{prefix}\\x06\\x169"}
    assert {key for _, key in lpushes} == lists
    assert (gate.held(), gate.parked()) == (0, 0)


def test_a_workflow_node_pushed_at_a_hand_off_receives_its_requirements_result(
    urls: dict[str, str], prefix: str, lpushes: list[tuple[str, str]]
) -> None:
    app = push_app(urls, prefix, "slots", limit=1)
    work = app.tasks["proj.work"]
    wf = Workflow(app)
    a = wf.add(work.s(7))
    b = wf.add(work.s(), requires=[a])  # receives a's result (7) as its first argument
    run = wf.apply_async()
    with threads_worker(app, concurrency=2):
        results = run.get(timeout=20)
    assert (results[a], results[b]) == (7, 7)
    wait_for(lambda: len(lpushes) >= 2, 5, "MONITOR to see both pushes")
    assert [client for client, _ in lpushes] == ["lua", "lua"]


def test_with_the_broker_elsewhere_or_the_setting_off_the_caller_publishes(
    urls: dict[str, str], prefix: str, lpushes: list[tuple[str, str]]
) -> None:
    split = push_app(urls, prefix, "own")
    off = push_app(urls, prefix, "slots", semaphore_broker_push=False)
    for app in (split, off):
        rt = runtime_for(app)
        assert rt is not None and not rt.broker_push
    result = off.tasks["proj.work"].delay(5)
    with threads_worker(off, concurrency=2):
        assert result.get(timeout=20) == 5
    wait_for(lambda: lpushes, 5, "MONITOR to see the publish")
    assert [client for client, _ in lpushes] != ["lua"]


def test_a_stored_pushed_message_reads_back_as_the_call_it_carries(
    urls: dict[str, str], prefix: str, slots: redis.Redis
) -> None:
    app = push_app(urls, prefix, "slots", limit=1)
    work = app.tasks["proj.work"]
    work.delay(1)
    parked = work.apply_async((3,), countdown=30, headers={"extra": "kept"})
    raw = slots.hget(runtime_for(app).group("work").keys["messages"], parked.id)
    assert raw is not None and raw.startswith(b"kombu\x1f" + prefix.encode() + b"\x1f")
    envelope = Envelope.decode(raw)
    args, kwargs, _ = loads(envelope.data, envelope.content_type, envelope.content_encoding)
    headers = envelope.publish_kwargs["headers"]
    assert (args, kwargs) == ([3], {})
    assert (headers["id"], headers["task"], headers["extra"]) == (parked.id, "proj.work", "kept")
    assert "semaphore_handoff" not in headers
    assert envelope.publish_kwargs["routing_key"] == prefix


@pytest.mark.parametrize("bad", [b"kombu\x1fno-payload", b"kombu\x1fq\x1f[1, 2]"])
def test_a_malformed_pushed_message_is_a_value_error(bad: bytes) -> None:
    with pytest.raises(ValueError, match="parked message"):
        Envelope.decode(bad)


def test_a_global_keyprefix_and_an_expiring_queue_are_kombu_s_own_either_way(
    urls: dict[str, str], prefix: str, slots: redis.Redis, lpushes: list[tuple[str, str]]
) -> None:
    # kombu's global_keyprefix: the script pushes to the prefixed list a worker reads.
    app = push_app(
        urls,
        prefix,
        "slots",
        limit=1,
        broker_transport_options={"global_keyprefix": f"{prefix}:kp:"},
    )
    work = app.tasks["proj.work"]
    first, second = work.delay(4), work.delay(6)
    assert slots.llen(f"{prefix}:kp:{prefix}") == 1
    with threads_worker(app, concurrency=2):
        assert (first.get(timeout=20), second.get(timeout=20)) == (4, 6)
    wait_for(lambda: len(lpushes) >= 2, 5, "MONITOR to see both pushes")
    assert [client for client, _ in lpushes] == ["lua", "lua"]
    lpushes.clear()

    # A queue with x-expires needs kombu's PEXPIREs beside the LPUSH: published as usual.
    expiring = push_app(urls, prefix, "slots", limit=1)
    expiring.conf.task_queues = [Queue(prefix, queue_arguments={"x-expires": 600_000})]
    done = expiring.tasks["proj.work"].delay(3)
    with threads_worker(expiring, concurrency=2):
        assert done.get(timeout=20) == 3
    wait_for(lambda: lpushes, 5, "MONITOR to see the publish")
    assert [client for client, _ in lpushes] == ["tcp"]
