"""The run's options and the batch runner every scenario uses.

A batch is queued while its worker does not consume (``cancel_consumer``), then released at
once (``add_consumer``), so the worker's throughput is measured and not the submitter's. The
tasks record ``"start end"`` themselves; a batch ends when every record arrived.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from celery import Celery

from celery_semaphore import runtime_for

from .cluster import Cluster, Worker, cpu_seconds

__all__ = ["GATE_VARIANTS", "Batch", "Bench", "BenchError", "Options", "Record"]

#: The gate variants scenarios 2 and 3 measure: name -> (its worker, the layout of its gates;
#: see benchmarks.cluster.Cluster.gate_home).
GATE_VARIANTS = {
    "gate": ("gated", "separate"),
    "gate-shared": ("gated-shared", "shared"),
    "gate-prefetch": ("gated-prefetch", "prefetch"),
}


class BenchError(RuntimeError):
    """A batch did not complete (a worker died or a call never ran)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What to run and how big; ``scale`` multiplies every call count but those of the memory
    run and of the backlog.

    ``retry_factor`` sets the in-task semaphore's retry countdown in task durations.
    """

    scenarios: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
    reps: int = 5
    scale: float = 1.0
    memory_calls: int = 20_000
    limit: int = 4
    concurrency: int = 8
    pool: str = "threads"
    durations_ms: tuple[float, ...] = (10.0, 100.0)
    dramatiq: bool = True
    retry_factor: float = 1.0
    #: Calls parked behind a full gate in scenario 7 (not scaled; 1,000,000 is the long run).
    backlog: int = 20_000
    #: Bytes of each parked call's message in scenario 7.
    backlog_message: int = 256
    #: Keys the backlog of scenario 7 is spread over (1: one lane).
    backlog_keys: int = 1

    def calls(self, base: int, minimum: int = 10) -> int:
        """A call count scaled by :attr:`scale`."""
        return max(minimum, round(base * self.scale))

    @property
    def free_limit(self) -> int:
        """Limit of the gate that never fills: above the largest batch queued at once."""
        return max(self.calls(1000, 20), self.calls(200), self.limit) + 64


@dataclasses.dataclass(frozen=True)
class Record:
    """What one run of a task recorded: ``time.time()`` at its start and its end."""

    start: float
    end: float
    extra: tuple[str, ...] = ()


@dataclasses.dataclass
class Batch:
    """The records of one batch and the wasted attempts (runs that had to retry)."""

    records: list[Record]
    wasted: int = 0
    #: CPU seconds the worker (all its processes) spent on the batch.
    cpu_s: float = float("nan")

    @property
    def throughput(self) -> float:
        """Calls per second from the first start to the last end."""
        span = max(r.end for r in self.records) - min(r.start for r in self.records)
        return len(self.records) / span if span > 0 else float("nan")

    def gaps(self) -> list[float]:
        """Seconds from each end to the next start, in start order (a single-slot sequence)."""
        ordered = sorted(self.records, key=lambda r: r.start)
        return [b.start - a.end for a, b in itertools.pairwise(ordered)]


class Bench:
    """The cluster plus the probe client, and the batch runner.

    Args:
        options: the run's options.
        cluster: servers and workers of the run (``None``: Group-level scenarios only).
    """

    def __init__(self, options: Options, cluster: Cluster | None) -> None:
        self.options = options
        #: ``None`` when only Group-level scenarios (7, 8, 9) run: no worker, no broker.
        self.cluster: Cluster = cluster  # type: ignore[assignment]
        self.probe: redis.Redis = (
            redis.Redis.from_url(cluster.urls["probe"]) if cluster else None  # type: ignore[assignment]
        )
        self._tags = itertools.count(1)
        self.workers: dict[str, Worker] = {}
        #: The Dramatiq broker and actors, once scenario 2 started a Dramatiq worker.
        self.dramatiq_actors: Any = None
        #: The harness's gated apps of the other layouts, built when first asked for.
        self._gate_apps: dict[str, Celery] = {}

    def tag(self, label: str) -> str:
        """A probe list name of its own for one batch."""
        return f"{self.cluster.prefix}:{label}:{next(self._tags)}"

    def worker(self, name: str) -> Worker:
        """A worker started by :meth:`start_workers`."""
        return self.workers[name]

    def start_workers(self, specs: dict[str, dict[str, Any]]) -> None:
        """Start workers in parallel (``name -> celery_worker kwargs``) and wait for them.

        A spec may name its ``layout`` (``"shared"``: the gates on the broker's Redis).
        """
        for name, spec in specs.items():
            if spec.get("kind") == "dramatiq":
                self.workers[name] = self.cluster.dramatiq_worker(
                    name, concurrency=spec["concurrency"]
                )
            else:
                self.workers[name] = self.cluster.celery_worker(
                    name,
                    gated=spec["gated"],
                    concurrency=spec.get("concurrency", self.options.concurrency),
                    pool=self.options.pool,
                    results=spec.get("results", False),
                    layout=spec.get("layout", "separate"),
                )
        self.cluster.ready([self.workers[n] for n in specs])

    def gate_variants(self) -> dict[str, tuple[Worker, Celery]]:
        """Each gate variant of :data:`GATE_VARIANTS`: its worker, and the harness's app that
        sends to it."""
        return {
            name: (self.worker(worker), self.gate_app(layout))
            for name, (worker, layout) in GATE_VARIANTS.items()
        }

    def gate_app(self, layout: str = "separate") -> Celery:
        """The harness's app with the extension (sends gated calls), its gates where the
        workers of ``layout`` keep theirs."""
        if layout == "separate":
            return self.cluster.gated_app
        if layout not in self._gate_apps:
            self._gate_apps[layout] = self.cluster.app(gated=True, layout=layout)
        return self._gate_apps[layout]

    def plain_app(self) -> Celery:
        """The harness's app without the extension."""
        return self.cluster.plain_app

    def wait_idle(self, gate: str, timeout: float = 30.0, layout: str = "separate") -> None:
        """Wait until ``gate`` (of ``layout``) has no holder and no parked call (the last
        release ran).

        Raises:
            BenchError: slots are still held after ``timeout`` seconds.
        """
        rt = runtime_for(self.gate_app(layout))
        assert rt is not None
        handle = rt.group_of_gate(gate)
        deadline = time.monotonic() + timeout
        while handle.held() or handle.parked():
            if time.monotonic() > deadline:
                raise BenchError(
                    f"gate {gate!r} still has {handle.held()} holders and {handle.parked()} "
                    "parked calls after the batch"
                )
            time.sleep(0.01)

    def run_batch(
        self,
        worker: Worker,
        label: str,
        submit: Callable[[str], int],
        timeout: float,
        pause: bool = True,
    ) -> Batch:
        """Queue a batch with ``submit(tag)`` (returns the number of records to expect), let
        ``worker`` run it and return its records.

        Raises:
            BenchError: the records did not all arrive within ``timeout`` seconds.
        """
        tag = self.tag(label)
        paused = pause and worker.kind == "celery"
        if paused:
            self.cluster.pause(worker)
        try:
            expected = submit(tag)
        finally:
            cpu_before = cpu_seconds(worker.pid)
            if paused:
                self.cluster.resume(worker)
        records = self.wait_records(tag, expected, timeout, worker)
        cpu = cpu_seconds(worker.pid) - cpu_before
        wasted = int(self.probe.get(f"{tag}:wasted") or 0)
        self.probe.delete(tag, f"{tag}:wasted")
        return Batch(records, wasted, cpu)

    def wait_records(self, tag: str, expected: int, timeout: float, worker: Worker) -> list[Record]:
        """Wait for ``expected`` records under ``tag`` and parse them.

        Raises:
            BenchError: the worker died or the records did not arrive in time.
        """
        deadline = time.monotonic() + timeout
        while (count := self.probe.llen(tag)) < expected:
            if not worker.alive():
                raise BenchError(f"worker {worker.name} died:\n{worker.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{worker.name}: {count} of {expected} calls ran within {timeout:.0f} s"
                )
            time.sleep(0.02)
        return [_parse(raw) for raw in self.probe.lrange(tag, 0, -1)]


def _parse(raw: bytes | str) -> Record:
    parts = (raw.decode() if isinstance(raw, bytes) else raw).split()
    return Record(float(parts[0]), float(parts[1]), tuple(parts[2:]))


def rotated(variants: Sequence[str], rep: int) -> list[str]:
    """``variants`` rotated by ``rep``, so no variant always runs first (drift, warm caches)."""
    shift = rep % len(variants)
    return [*variants[shift:], *variants[:shift]]
