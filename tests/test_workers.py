"""End to end with `celery worker -P prefork` and `celery beat` subprocesses, and over RabbitMQ."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
import redis
from celery import Celery

from celery_semaphore import runtime_for
from celery_semaphore.group import Acquired

from . import proj
from .conftest import acquire, at_rest, slot_keys, threads_worker, wait_for
from .faultkit import Cluster, cluster_fixture, peak_overlap  # noqa: F401

pytestmark = pytest.mark.slow


def test_a_prefork_worker_and_a_real_beat_keep_a_hundred_calls_within_three_slots(
    cluster: Cluster, slots: redis.Redis, prefix: str
) -> None:
    cluster.configure(CS_LIMIT="3", CS_LEASE="30")
    cluster.worker("w1", concurrency=8)
    cluster.beat()
    sleep = cluster.app.tasks["fault.sleep"]
    results = [sleep.delay(20) for _ in range(100)]
    assert [r.get(timeout=120) for r in results] == [20] * 100
    runs = cluster.runs()
    assert len(runs) == 100
    # Measured by the tasks themselves: the start and end each run recorded.
    assert peak_overlap(runs) == 3
    assert (cluster.gate.held(), cluster.gate.parked()) == (0, 0)
    assert slot_keys(slots, prefix) == at_rest(prefix, "work")


def test_beat_returns_the_slot_of_a_dead_holder_within_lease_plus_tick(cluster: Cluster) -> None:
    cluster.configure(CS_LIMIT="1", CS_TICK="0.5")
    gate = cluster.gate
    # A holder whose worker died before releasing: a 1 s lease nobody renews.
    assert acquire(gate, "dead-holder", b"", lease_s=1.0)[0] is Acquired.GRANTED
    waiting = cluster.app.tasks["fault.sleep"].delay(5)
    assert gate.parked() == 1
    cluster.worker("w1", concurrency=2)
    cluster.beat()
    # lease (1 s) + tick (0.5 s), plus beat's and the worker's start-up.
    assert waiting.get(timeout=30) == 5
    assert "dead-holder" not in gate.holders()


def _rabbitmq_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _rabbitmq_reachable(), reason="no RabbitMQ listening on 127.0.0.1:5672")
def test_rabbitmq_as_broker_with_redis_only_for_the_slots(
    urls: dict[str, str], prefix: str, slots: redis.Redis
) -> None:
    app: Celery = proj.create_app(
        f"proj-amqp-{prefix}",
        broker="amqp://guest:guest@127.0.0.1:5672//",
        backend=urls["backend"],
        slots_url=urls["slots"],
        probe_url=urls["probe"],
        prefix=prefix,
        queue=prefix,
        limit=3,
    )
    try:
        with threads_worker(app, concurrency=8):
            results = [app.tasks["proj.work"].delay(20) for _ in range(100)]
            assert [r.get(timeout=60) for r in results] == [20] * 100
        assert app.probe.value("peak") == 3
        assert slot_keys(slots, prefix) == at_rest(prefix, "work")
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(prefix)


def test_calls_from_inside_a_task_are_gated_too(make_app: Callable[..., Celery]) -> None:
    app = make_app(limit=2)

    @app.task(name="proj.fan_out", shared=False)
    def fan_out(n: int) -> list[str]:
        return [app.tasks["proj.work"].delay(10).id for _ in range(n)]

    with threads_worker(app, concurrency=8):
        ids = fan_out.delay(12).get(timeout=20)
        assert [app.AsyncResult(i).get(timeout=30) for i in ids] == [10] * 12
    assert app.probe.value("peak") == 2
    wait_for(lambda: runtime_for(app).group("work").held() == 0, 5, "slots to be free")
