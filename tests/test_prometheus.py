"""The Prometheus endpoint, scraped over HTTP and parsed with prometheus_client's own parser.

Real redis-server, a real threads worker. Calls are sent before the worker starts, so what
was granted, parked and rejected at submit is known exactly.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from celery_semaphore import GateFull, admin, install
from celery_semaphore.prometheus import SemaphoreCollector, start_server
from celery_semaphore.server import free_port

from .conftest import ROOT, threads_worker, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return parse(response.read().decode())


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_the_endpoint_counts_the_calls_made_and_shows_the_gate_now(
    make_app: Callable[..., Celery],
) -> None:
    app = make_app(limit=2)
    work = app.tasks["proj.work"]
    server, _ = start_server(app, port=0)
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        # No worker yet: two calls take the two units, four park, one is refused.
        results = [work.delay(ms=60) for _ in range(6)]
        with pytest.raises(GateFull):
            work.apply_async(kwargs={"ms": 60}, max_pending=4, on_full="reject")
        now = scrape(url)
        assert sample(now, "celery_semaphore_up") == 1
        assert sample(now, "celery_semaphore_limit", gate="work") == 2
        assert sample(now, "celery_semaphore_held", gate="work") == 2
        assert sample(now, "celery_semaphore_holders", gate="work") == 2
        assert sample(now, "celery_semaphore_parked_calls", gate="work") == 4
        assert sample(now, "celery_semaphore_oldest_parked_seconds", gate="work") > 0
        assert sample(now, "celery_semaphore_paused", gate="work") == 0
        assert sample(now, "celery_semaphore_granted_total", gate="work") == 2
        assert sample(now, "celery_semaphore_parked_total", gate="work") == 4
        assert sample(now, "celery_semaphore_rejected_total", gate="work") == 1
        assert sample(now, "celery_semaphore_released_total", gate="work") == 0

        with threads_worker(app, concurrency=8):
            assert [r.get(timeout=30) for r in results] == [60] * 6
            group = install(app).group("work")
            wait_for(lambda: admin.status(group, "work").held == 0, what="the gate to empty")
        done = scrape(url)
    finally:
        server.shutdown()
        server.server_close()

    def total(name: str) -> float:
        return sample(done, f"celery_semaphore_{name}_total", gate="work")

    assert total("granted") == 6
    assert total("dispatched") == 4
    assert total("parked") == 4
    assert total("released") == 6
    assert total("rejected") == 1
    for name in ("reclaimed", "expired", "dropped", "cancelled", "replaced"):
        assert total(name) == 0, name
    assert app.probe.value("peak") == 2  # type: ignore[attr-defined]
    assert sample(done, "celery_semaphore_peak", gate="work") == 2
    assert sample(done, "celery_semaphore_held", gate="work") == 0
    assert sample(done, "celery_semaphore_parked_calls", gate="work") == 0
    assert sample(done, "celery_semaphore_oldest_parked_seconds", gate="work") == 0
    wait = {name: sample(done, f"celery_semaphore_wait_seconds_{name}", gate="work")
            for name in ("count", "sum")}  # fmt: skip
    assert wait["count"] == total("granted")
    # Granted at once waited 0 s; a parked call waited at least one 60 ms run.
    bucket = "celery_semaphore_wait_seconds_bucket"
    assert sample(done, bucket, gate="work", le="0.005") == 2
    assert sample(done, bucket, gate="work", le="0.05") == 2
    assert sample(done, bucket, gate="work", le="+Inf") == 6
    assert wait["sum"] >= 4 * 0.06
    hold = "celery_semaphore_hold_seconds"
    assert sample(done, f"{hold}_count", gate="work") == 6
    assert sample(done, f"{hold}_bucket", gate="work", le="0.05") == 0
    assert sample(done, f"{hold}_sum", gate="work") >= 6 * 0.06


def test_serve_blocks_until_interrupted_and_serves_what_another_process_did(
    make_app: Callable[..., Celery], urls: dict[str, str], prefix: str
) -> None:
    app = make_app(limit=3)
    app.tasks["proj.work"].delay(ms=10)  # no worker: it holds one unit
    port = free_port()
    conf: dict[str, Any] = {
        "name": f"proj-{prefix}", "broker": urls["broker"], "backend": urls["backend"],
        "slots_url": urls["slots"], "probe_url": urls["probe"], "prefix": prefix,
        "queue": prefix, "limit": 3,
    }  # fmt: skip
    code = (
        "import json, sys\n"
        "from tests import proj\n"
        "from celery_semaphore.prometheus import serve\n"
        "serve(proj.create_app(**json.loads(sys.argv[1])), port=int(sys.argv[2]))\n"
        "print('stopped')\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(conf), str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:

        def scraped() -> Samples | None:
            assert process.poll() is None, process.communicate()
            try:
                return scrape(f"http://127.0.0.1:{port}/metrics")
            except (urllib.error.URLError, ConnectionError):
                return None

        samples = wait_for(scraped, what="the metrics server")
        assert sample(samples, "celery_semaphore_granted_total", gate="work") == 1
        assert sample(samples, "celery_semaphore_held", gate="work") == 1
        assert sample(samples, "celery_semaphore_limit", gate="work") == 3
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert out.strip() == "stopped"


def test_an_unreachable_redis_is_up_0_and_registering_reads_nothing(
    make_app: Callable[..., Celery],
) -> None:
    app = make_app(
        semaphore_redis_url=f"redis://127.0.0.1:{free_port()}/0", semaphore_redis_timeout=0.5
    )
    # auto_describe would call collect() at registration if the collector had no describe().
    registry = CollectorRegistry(auto_describe=True)
    registry.register(SemaphoreCollector(app))
    samples = parse(generate_latest(registry).decode())
    assert samples == {("celery_semaphore_up", ()): 0}
