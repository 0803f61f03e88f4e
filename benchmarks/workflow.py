"""Scenario 10: a layered DAG as a :class:`~celery_semaphore.Workflow`, against the same work
as a Celery canvas.

The DAG: ``LAYERS`` layers of ``width`` nodes, each node past the first layer requiring
``REQUIRES`` distinct random nodes of the layer before (seeded per repetition). Every node is
a call of ``NODE_MS`` that records its start, its end and its name from inside the task.

- Workflow: every node of the DAG through the gate ``limited`` (the limit under test) of the
  gated worker. A node's requirement hop is its start - the latest end among its
  requirements: what the last requirement's end took to start it, including any wait for a
  unit of the gate (the DAG is wider than the gate, so most nodes do wait). Net of that
  wait, the hop runs from the later of that end and the end that freed the unit the node
  took (see :func:`requirement_hops`): the hand-off itself.
- Canvas: the same nodes as ``chain(group(layer 1), ..., group(layer L))``, which Celery
  turns into nested chords (each layer the header of a chord whose body is the rest), through
  a plain worker with ``-c limit`` (as many at once as the gate allows) and the Redis result
  backend that chords need. Each layer waits for the whole layer before: the barrier a canvas
  can express, where the workflow waits for two nodes.
- Hop floor: one relay chain of plain tasks of ``NODE_MS``, each sending its successor at its
  end, as in scenario 3, in the same repetition.

Both graphs are queued while their worker does not consume (the workflow: every node in
Redis, the first layer's first calls published; the canvas: its first layer published), then
released at once; total time is first start to last end, from the tasks' own timestamps.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import defaultdict
from typing import Any

import redis
from celery import chain, group
from celery.backends.redis import RedisBackend

from celery_semaphore import Workflow

from .harness import Bench, BenchError, Record, rotated
from .report import Row
from .stats import Spread, peak_overlap, percentile, ratio_of

__all__ = ["Dag", "SendOnlyRedisBackend", "layered_dag", "requirement_hops", "workflow"]

LAYERS = 10
#: Nodes per layer at scale 1 (1,000 nodes in all).
WIDTH = 100
#: Requirements of each node past the first layer, in the layer before.
REQUIRES = 2
NODE_MS = 1.0


class SendOnlyRedisBackend(RedisBackend):
    """The Redis result backend of a process that sends chords and never waits for a result.

    Celery's result sets subscribe (pubsub) to every task id they hold as soon as a canvas is
    frozen; nothing here reads those messages, and the subscriptions would outlive the run's
    Redis (each AsyncResult unsubscribes in ``__del__``, at interpreter exit).
    """

    def add_pending_result(
        self, result: Any, weak: bool = False, start_drainer: bool = True
    ) -> Any:
        return result

    def remove_pending_result(self, result: Any) -> Any:
        return result


@dataclasses.dataclass(frozen=True)
class Dag:
    """Node names by layer, and each node's requirements (names, in ``requires`` order)."""

    layers: list[list[str]]
    requires: dict[str, list[str]]

    @property
    def size(self) -> int:
        """The number of nodes."""
        return len(self.requires)


def layered_dag(layers: int, width: int, rng: random.Random) -> Dag:
    """``layers`` layers of ``width`` nodes, each past the first requiring ``REQUIRES``
    distinct random nodes of the layer before (all of them when the layer is narrower)."""
    names = [[f"L{layer}-{i}" for i in range(width)] for layer in range(layers)]
    requires = {
        name: rng.sample(names[layer - 1], min(REQUIRES, width)) if layer else []
        for layer, row in enumerate(names)
        for name in row
    }
    return Dag(names, requires)


def requirement_hops(
    requires: dict[str, list[str]], runs: dict[str, list[Record]], limit: int | None = None
) -> list[float]:
    """Seconds from each node's last requirement's end to its start (nodes with requirements).

    With ``limit``, net of the wait for a unit: from the later of that end and the end that
    freed the unit the node took. At most ``limit`` calls run at once, so the i-th start
    (0-based, in start order) needed i - limit + 1 ends before it: its unit is taken as freed
    by the (i - limit)-th end (in end order).
    """
    starts = sorted((rs[0].start, name) for name, rs in runs.items())
    ends = sorted(rs[0].end for rs in runs.values())
    hops = []
    for i, (start, name) in enumerate(starts):
        if not requires[name]:
            continue
        ready = max(runs[r][0].end for r in requires[name])
        if limit is not None and i >= limit:
            ready = max(ready, ends[i - limit])
        hops.append(start - ready)
    return hops


def _by_node(records: list[Record]) -> dict[str, list[Record]]:
    runs: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        runs[record.extra[0]].append(record)
    return runs


def _span(records: list[Record]) -> float:
    return max(r.end for r in records) - min(r.start for r in records)


def _check_once(dag: Dag, runs: dict[str, list[Record]], variant: str) -> None:
    # The hops below are only meaningful when every node ran exactly once.
    wrong = {n: len(runs.get(n, [])) for n in dag.requires if len(runs.get(n, [])) != 1}
    if wrong or set(runs) - set(dag.requires):
        raise BenchError(f"{variant}: nodes that did not run exactly once: {wrong}")


def workflow(bench: Bench) -> list[Row]:
    """Scenario 10: requirement hop and total time of a layered DAG, workflow against canvas."""
    opts = bench.options
    width = opts.calls(WIDTH, 4)
    relay_n = opts.calls(200, 10)
    gated_w, canvas_w = bench.worker("gated"), bench.worker("canvas")
    plain_w = bench.worker("plain")
    gated, plain = bench.gate_app(), bench.plain_app()
    canvas = bench.cluster.app(gated=False)
    # The canvas worker's backend is the plain Redis one: it joins the chords.
    results_url = bench.cluster.urls["results"]
    canvas.conf.result_backend = f"{__name__}:{SendOnlyRedisBackend.__name__}+{results_url}"
    broker = redis.Redis.from_url(bench.cluster.urls["broker"])
    timeout = 60.0 + LAYERS * width * 0.05
    dag = layered_dag(LAYERS, width, random.Random(0))  # each repetition draws its own
    submit_s: list[float] = []
    message_bytes: list[float] = []

    def workflow_batch(tag: str) -> int:
        wf = Workflow(gated)
        task = gated.tasks["bench.gated_dag"]
        nodes: dict[str, Any] = {}
        for row in dag.layers:
            for name in row:
                sig = task.s(ms=NODE_MS, tag=tag, node=name).set(queue=gated_w.queue)
                nodes[name] = wf.add(sig, requires=[nodes[r] for r in dag.requires[name]])
        started = time.perf_counter()
        wf.apply_async()
        submit_s.append(time.perf_counter() - started)
        return dag.size

    def canvas_batch(tag: str) -> int:
        task = canvas.tasks["bench.dag"]
        # No result is stored (chords join through the backend's own lists) and none awaited.
        options = {"queue": canvas_w.queue, "ignore_result": True}
        layers = [
            group(task.s(ms=NODE_MS, tag=tag, node=name).set(**options) for name in row)
            for row in dag.layers
        ]
        chain(*layers, app=canvas).apply_async()
        first = broker.lindex(canvas_w.queue, 0)  # a first-layer message, waiting
        message_bytes.append(len(first) if first else float("nan"))
        return dag.size

    def relay_batch(tag: str) -> int:
        plain.tasks["bench.relay"].apply_async((NODE_MS, tag, 0, relay_n), queue=plain_w.queue)
        return relay_n

    variants = {
        "workflow": (gated_w, workflow_batch),
        "canvas": (canvas_w, canvas_batch),
        "relay": (plain_w, relay_batch),
    }
    hops: dict[str, list[list[float]]] = defaultdict(list)  # ms, one list per repetition
    total: dict[str, list[float]] = defaultdict(list)
    cpu_us: dict[str, list[float]] = defaultdict(list)  # worker CPU per node
    facts: dict[str, Any] = {
        "limit": opts.limit,
        "nodes_sent": 0,
        "nodes_completed": 0,
        "canvas_nodes_sent": 0,
        "canvas_nodes_completed": 0,
        "peak_running": 0,
        # Nodes that started before one of their requirements ended, over every repetition.
        "order_violations": 0,
    }
    try:
        for rep in range(opts.reps):
            dag = layered_dag(LAYERS, width, random.Random(rep))
            for name in rotated(list(variants), rep):
                worker, batch_of = variants[name]
                batch = bench.run_batch(worker, f"workflow-{name}", batch_of, timeout)
                if name == "relay":
                    hops["relay"].append([g * 1000.0 for g in batch.gaps()])
                    continue
                runs = _by_node(batch.records)
                _check_once(dag, runs, name)
                total[name].append(_span(batch.records))
                cpu_us[name].append(batch.cpu_s / dag.size * 1e6)
                if name == "canvas":
                    facts["canvas_nodes_sent"] += dag.size
                    facts["canvas_nodes_completed"] += len(batch.records)
                    # A chord body waits for its whole header: the layer before.
                    barrier = {
                        n: dag.layers[i - 1] if i else []
                        for i, row in enumerate(dag.layers)
                        for n in row
                    }
                    hops["canvas"].append(_ms_all(requirement_hops(barrier, runs)))
                    continue
                bench.wait_idle("limited")
                facts["nodes_sent"] += dag.size
                facts["nodes_completed"] += len(batch.records)
                peak = peak_overlap([(r.start, r.end) for r in batch.records])
                facts["peak_running"] = max(facts["peak_running"], peak)
                # The last repetition's graph and runs: the smoke test checks the order.
                facts["requires"] = dag.requires
                facts["runs"] = {n: [[r.start, r.end] for r in rs] for n, rs in runs.items()}
                raw = _ms_all(requirement_hops(dag.requires, runs))
                facts["order_violations"] += sum(h < 0 for h in raw)
                hops["workflow"].append(raw)
                hops["net"].append(_ms_all(requirement_hops(dag.requires, runs, opts.limit)))
    finally:
        broker.close()
    p50 = {k: [percentile(v, 50) for v in reps] for k, reps in hops.items()}
    p99 = {k: [percentile(v, 99) for v in reps] for k, reps in hops.items()}
    label = "10 workflow"
    what = (
        f"{dag.size} nodes of {NODE_MS:g} ms, {LAYERS} layers of {width}, each requiring "
        f"{min(REQUIRES, width)} of the layer before; gate of {opts.limit}, -c {opts.concurrency}"
    )
    rate = [dag.size / t for t in total["workflow"]]
    submit = Spread(submit_s)
    return [
        Row(
            label,
            f"hop floor p50 / p99 (relay chain of {relay_n} plain tasks of {NODE_MS:g} ms: end "
            "-> successor start)",
            _p50_p99(p50["relay"], p99["relay"]),
        ),
        Row(
            label,
            f"requirement hop p50 / p99: last requirement's end -> start ({what})",
            _p50_p99(p50["workflow"], p99["workflow"]),
            facts=facts,
        ),
        Row(
            label,
            "requirement hop / hop floor, p50 / p99",
            _ratios(p50, p99, "workflow", "relay"),
        ),
        Row(
            label,
            "requirement hop net of the wait for a unit of the gate, p50 / p99: from the later "
            "of the last requirement's end and the end that freed the unit taken",
            _p50_p99(p50["net"], p99["net"]),
        ),
        Row(label, "net requirement hop / hop floor, p50 / p99", _ratios(p50, p99, "net", "relay")),
        Row(
            label,
            f"canvas (chain of chords, plain worker -c {opts.limit}): last end of the layer "
            "before -> start, p50 / p99",
            _p50_p99(p50["canvas"], p99["canvas"]),
        ),
        Row(
            label,
            "total time, first start -> last end: workflow / canvas",
            f"{Spread(total['workflow']).format('{:.2f}', ' s')} / "
            f"{Spread(total['canvas']).format('{:.2f}', ' s')} (workflow: "
            f"{Spread(rate).format('{:.0f}', ' nodes/s')})",
        ),
        Row(
            label,
            "total time, workflow / canvas",
            ratio_of(total["workflow"], total["canvas"]).format(),
        ),
        Row(
            label,
            "worker CPU per node: workflow / canvas (10 ms clock ticks)",
            f"{Spread(cpu_us['workflow']).format('{:.0f}', ' µs')} / "
            f"{Spread(cpu_us['canvas']).format('{:.0f}', ' µs')}",
        ),
        Row(
            label,
            "canvas: size of a first-layer message (it carries the rest of the canvas)",
            Spread([b / 1000.0 for b in message_bytes]).format("{:.0f}", " kB"),
        ),
        Row(
            label,
            f"Workflow.apply_async() of {dag.size} nodes (not in the total)",
            f"{submit.format('{:.2f}', ' s')}, {dag.size / submit.median:.0f} nodes/s",
        ),
    ]


def _ms_all(seconds: list[float]) -> list[float]:
    return [s * 1000.0 for s in seconds]


def _p50_p99(p50: list[float], p99: list[float]) -> str:
    return f"{Spread(p50).format('{:.2f}', ' ms')} / {Spread(p99).format('{:.2f}', ' ms')}"


def _ratios(p50: dict[str, list[float]], p99: dict[str, list[float]], name: str, floor: str) -> str:
    return (
        f"{ratio_of(p50[name], p50[floor]).format('{:.1f}')} / "
        f"{ratio_of(p99[name], p99[floor]).format('{:.1f}')}"
    )
