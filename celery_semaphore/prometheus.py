"""The gates in the Prometheus text format: a collector for ``prometheus_client`` and a server.

Needs the ``prometheus`` extra (``pip install 'celery-semaphore[prometheus]'``). A scrape reads
every known gate with :func:`~celery_semaphore.admin.status` and
:func:`~celery_semaphore.admin.metrics` (a few pipelined reads per gate, no scan), so it costs
the gated calls nothing. Each series carries the label ``gate``:

- counters ``celery_semaphore_<name>_total`` for granted, dispatched, released, reclaimed,
  parked, rejected, expired, dropped, cancelled and replaced;
- histograms ``celery_semaphore_wait_seconds`` (how long calls waited for room, 0 for those
  granted at once) and ``celery_semaphore_hold_seconds`` (how long they held it);
- gauges of the gate now: ``limit``, ``held`` and ``peak`` (units), ``paused`` (1 or 0),
  ``key_held{key=...}`` (the ten busiest keys of a keyed gate); and of its group (a gate
  alone is its own group): ``holders``, ``parked_calls``, ``oldest_parked_seconds`` (0 when
  none is parked), ``waiting_calls{reason="time"|"requirements"}``;
- ``celery_semaphore_up``: 1 when Redis answered the scrape, else 0 (and no other series).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

import redis
from celery import Celery
from celery.utils.log import get_logger
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from . import admin
from .extension import install

__all__ = ["NAMESPACE", "SemaphoreCollector", "serve", "start_server"]

logger = get_logger(__name__)

#: First part of every metric name.
NAMESPACE = "celery_semaphore"

_COUNTER_HELP = {
    "granted": "Calls that were given room of the gate.",
    "dispatched": "Parked calls that were handed room and sent to a worker.",
    "released": "Calls that gave their room back.",
    "reclaimed": "Holds whose lease expired and were taken back (a worker died).",
    "parked": "Calls that found no room and parked.",
    "rejected": "Calls refused at submit by max_pending with on_full='reject'.",
    "expired": "Parked calls that gave up after their wait_timeout.",
    "dropped": "Calls lost with their worker, or dropped by max_pending with on_full='drop'.",
    "cancelled": "Calls cancelled before they ran.",
    "replaced": "Parked calls replaced by a newer one (on_full='replace').",
}
_HISTOGRAM_HELP = {
    "wait": "Seconds calls waited for room (0 for those granted at once).",
    "hold": "Seconds calls held their room.",
}
_GAUGE_HELP = {
    "limit": "The limit in force (-1: per-key limits only).",
    "held": "Units held now (call weights counted).",
    "peak": "Most units held at once.",
    "holders": "Calls holding room of the gate's group now.",
    "parked_calls": "Calls parked in the gate's group now, waiting for room.",
    "oldest_parked_seconds": "Seconds the oldest call parked in the group has waited (0: none).",
    "paused": "1 while the gate is paused, else 0.",
}


class _Families:
    """The metric families of one scrape, filled gate by gate."""

    def __init__(self) -> None:
        self.counters = {
            name: CounterMetricFamily(f"{NAMESPACE}_{name}", _COUNTER_HELP[name], labels=["gate"])
            for name in ("granted", *admin.COUNTERS)
        }
        self.histograms = {
            name: HistogramMetricFamily(f"{NAMESPACE}_{name}_seconds", text, labels=["gate"])
            for name, text in _HISTOGRAM_HELP.items()
        }
        self.gauges = {
            name: GaugeMetricFamily(f"{NAMESPACE}_{name}", text, labels=["gate"])
            for name, text in _GAUGE_HELP.items()
        }
        self.waiting = GaugeMetricFamily(
            f"{NAMESPACE}_waiting_calls",
            "Calls waiting for their start time or their requirements, taking no room.",
            labels=["gate", "reason"],
        )
        self.key_held = GaugeMetricFamily(
            f"{NAMESPACE}_key_held",
            "Units held by the busiest keys of a keyed gate (ten at most).",
            labels=["gate", "key"],
        )

    def add(self, status: admin.GateStatus, metrics: admin.Metrics) -> None:
        gate = status.gate
        for name, count in metrics.counters.items():
            self.counters[name].add_metric([gate], count)
        for name, histogram in (("wait", metrics.wait), ("hold", metrics.hold)):
            buckets = [(floatToGoString(le), n) for le, n in histogram.buckets]
            self.histograms[name].add_metric([gate], buckets, histogram.sum_s)
        now: dict[str, float] = {
            "held": status.held,
            "peak": status.peak,
            "holders": status.holders,
            "parked_calls": status.parked,
            "oldest_parked_seconds": status.oldest_parked_s or 0.0,
            "paused": int(status.paused),
        }
        if status.limit is not None:
            now["limit"] = status.limit
        for name, value in now.items():
            self.gauges[name].add_metric([gate], value)
        self.waiting.add_metric([gate, "time"], status.waiting_time)
        self.waiting.add_metric([gate, "requirements"], status.waiting_requirements)
        for key, units in status.busiest_keys:
            self.key_held.add_metric([gate, key], units)

    def __iter__(self) -> Iterator[Metric]:
        yield from self.counters.values()
        yield from self.histograms.values()
        yield from self.gauges.values()
        yield self.waiting
        yield self.key_held


class SemaphoreCollector:
    """A ``prometheus_client`` collector of every gate the app and Redis know.

    Args:
        app: the Celery app whose gates are read (celery_semaphore is installed on it).

    Examples:
        >>> from prometheus_client import REGISTRY
        >>> REGISTRY.register(SemaphoreCollector(app))
    """

    def __init__(self, app: Celery) -> None:
        self.runtime = install(app)

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples, so registering one reads nothing from Redis."""
        yield _up(None)
        yield from _Families()

    def collect(self) -> Iterator[Metric]:
        """Read every known gate from Redis; a Redis error yields ``up`` 0 and is logged."""
        rt = self.runtime
        families = _Families()
        try:
            for gate, group_name in admin.known_gates(rt).items():
                group = rt.group(group_name)
                families.add(admin.status(group, gate), admin.metrics(group, gate))
        except (redis.RedisError, OSError) as exc:
            logger.warning("celery_semaphore metrics: Redis at %s: %s", rt.url, exc)
            yield _up(0)
            return
        yield _up(1)
        yield from families


def _up(value: int | None) -> GaugeMetricFamily:
    up = GaugeMetricFamily(f"{NAMESPACE}_up", "1 when the gates' Redis answered, else 0.")
    if value is not None:
        up.add_metric([], value)
    return up


def start_server(
    app: Celery, host: str = "127.0.0.1", port: int = 9808
) -> tuple[WSGIServer, threading.Thread]:
    """Serve the gates' metrics over HTTP from a daemon thread, on a registry of their own.

    Args:
        app: the Celery app whose gates are served.
        host: the address to listen on.
        port: the TCP port (0 picks a free one: read it from ``server.server_port``).

    Returns:
        ``(server, thread)``: stop with ``server.shutdown()``.
    """
    registry = CollectorRegistry()
    registry.register(SemaphoreCollector(app))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return server, thread


def serve(app: Celery, host: str = "127.0.0.1", port: int = 9808) -> None:
    """Serve the gates' metrics over HTTP until interrupted (Ctrl-C); then stop and return.

    Args:
        app: the Celery app whose gates are served.
        host: the address to listen on (``0.0.0.0`` for every interface).
        port: the TCP port.

    Raises:
        OSError: the port is taken.

    Examples:
        >>> serve(app, port=9808)  # blocks; scrape http://127.0.0.1:9808/metrics
    """
    server, thread = start_server(app, host, port)
    logger.info("celery_semaphore metrics on http://%s:%d/metrics", host, server.server_port)
    try:
        while thread.is_alive():
            thread.join(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
