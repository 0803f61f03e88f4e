"""Scenarios 1 (overhead) and 2 (slot utilisation, with the relay ceiling).

Throughput is calls / (last end - first start), from the tasks' own timestamps, with the
batch queued before the worker consumes it. Utilisation is throughput / (limit / duration).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from .harness import GATE_VARIANTS, Batch, Bench, rotated
from .proj import gated_task_name
from .report import Row, verdict
from .stats import Spread, peak_overlap, ratio_of

__all__ = ["overhead", "utilisation"]

# Log lines celery_semaphore writes when it refuses a delivered run: wasted attempts.
_REFUSED = (
    "late copy skipped",
    "held nothing; sent through its gate again",
    "already runs elsewhere",
    "could not be recorded (Redis unreachable); skipped",
)


def _send_many(task: Any, n: int, args: tuple[Any, ...], queue: str) -> int:
    for _ in range(n):
        task.apply_async(args, queue=queue)
    return n


def _timeout(calls: int, per_call_s: float) -> float:
    # Generous: a run ten times slower than expected still completes, a stuck one fails.
    return 30.0 + 10.0 * calls * per_call_s


def overhead(bench: Bench) -> list[Row]:
    """Scenario 1: trivial tasks through a gate that never fills, against plain Celery."""
    opts = bench.options
    n = opts.calls(1000, 20)
    plain_w, gated_w = bench.worker("plain"), bench.worker("gated")
    shared_w = bench.worker("gated-shared")
    plain, gated, shared = bench.plain_app(), bench.gate_app(), bench.gate_app("shared")
    runs: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    batches = {
        "plain": lambda tag: _send_many(plain.tasks["bench.plain"], n, (0, tag), plain_w.queue),
        "gated": lambda tag: _send_many(
            gated.tasks[gated_task_name("free")], n, (0, tag), gated_w.queue
        ),
        "gated-shared": lambda tag: _send_many(
            shared.tasks[gated_task_name("free")], n, (0, tag), shared_w.queue
        ),
        "in-task": lambda tag: _send_many(
            plain.tasks["bench.locked"], n, (0, tag, opts.free_limit, 10.0), plain_w.queue
        ),
    }
    workers = {"plain": plain_w, "gated": gated_w, "gated-shared": shared_w, "in-task": plain_w}
    sent: dict[str, int] = defaultdict(int)
    completed: dict[str, int] = defaultdict(int)
    for rep in range(opts.reps):
        for variant in rotated(list(batches), rep):
            batch = bench.run_batch(
                workers[variant], f"overhead-{variant}", batches[variant], _timeout(n, 0.002)
            )
            sent[variant] += n
            completed[variant] += len(batch.records)
            runs[variant].append(batch.throughput)
            cpu[variant].append(batch.cpu_s / n * 1e6)
            if variant == "gated":
                bench.wait_idle("free")
            if variant == "gated-shared":
                bench.wait_idle("free", layout="shared")
    ratio = ratio_of(runs["gated"], runs["plain"])
    shared_ratio = ratio_of(runs["gated-shared"], runs["plain"])
    added = ratio_of(cpu["gated"], cpu["plain"], op=lambda g, p: g - p)
    added_shared = ratio_of(cpu["gated-shared"], cpu["plain"], op=lambda g, p: g - p)
    in_task = ratio_of(runs["in-task"], runs["plain"])
    name = "1 overhead"
    per = f"{n} trivial calls, -c {opts.concurrency}"
    return [
        Row(name, f"plain Celery throughput ({per})", Spread(runs["plain"]).format("{:.0f}", "/s")),
        Row(
            name,
            f"gated throughput, gate never fills (limit {opts.free_limit})",
            Spread(runs["gated"]).format("{:.0f}", "/s"),
        ),
        Row(
            name,
            "gated / plain",
            ratio.format(),
            ">= 0.90",
            verdict(ratio.median >= 0.90),
            facts={"calls_sent": dict(sent), "calls_completed": dict(completed)},
        ),
        Row(
            name,
            "gated / plain, one Redis (broker push)",
            shared_ratio.format(),
            ">= 0.90",
            verdict(shared_ratio.median >= 0.90),
        ),
        Row(
            name,
            "worker CPU per call, plain / gated / gated one Redis / in-task (10 ms clock ticks)",
            " / ".join(
                Spread(cpu[k]).format("{:.0f}", " µs")
                for k in ("plain", "gated", "gated-shared", "in-task")
            ),
        ),
        Row(
            name,
            "worker CPU added per gated call, two Redis / one Redis",
            f"{added.format('{:.0f}', ' µs')} / {added_shared.format('{:.0f}', ' µs')}",
            "< 100 µs",
            verdict(max(added.median, added_shared.median) < 100),
        ),
        Row(
            name,
            "in-task Redis semaphore, never contended / plain",
            in_task.format(),
            "reference: 0.74 (26 % cost)",
        ),
    ]


def utilisation(bench: Bench) -> list[Row]:
    """Scenario 2: limit N, worker concurrency 8, tasks of each duration; and the relay ceiling."""
    rows: list[Row] = []
    for ms in bench.options.durations_ms:
        rows += _utilisation_at(bench, ms)
    return rows


def _utilisation_at(bench: Bench, ms: float) -> list[Row]:
    opts = bench.options
    limit = opts.limit
    n = opts.calls(400 if ms <= 10 else 80, limit * 5)
    n_dramatiq = opts.calls(200 if ms <= 10 else 40, limit * 5)
    ideal = limit / (ms / 1000.0)
    plain_w, c4_w, plain = bench.worker("plain"), bench.worker("c4"), bench.plain_app()
    per_chain = max(1, n // limit)
    timeout = _timeout(n, ms / 1000.0 / limit)

    def relay(tag: str) -> int:
        for chain in range(limit):
            plain.tasks["bench.relay"].apply_async((ms, tag, chain, per_chain), queue=plain_w.queue)
        return per_chain * limit

    def gate_batch_of(app: Any, queue: str) -> Any:
        task = app.tasks[gated_task_name("limited")]
        return lambda tag: _send_many(task, n, (ms, tag), queue)

    variants: dict[str, tuple[Any, Any, int]] = {
        name: (worker, gate_batch_of(app, worker.queue), n)
        for name, (worker, app) in bench.gate_variants().items()
    }
    variants.update(
        {
            "relay": (plain_w, relay, per_chain * limit),
            "c4": (
                c4_w,
                lambda tag: _send_many(plain.tasks["bench.plain"], n, (ms, tag), c4_w.queue),
                n,
            ),
            "in-task": (
                plain_w,
                lambda tag: _send_many(
                    plain.tasks["bench.locked"],
                    n,
                    (ms, tag, limit, ms * opts.retry_factor),
                    plain_w.queue,
                ),
                n,
            ),
        }
    )
    if "dramatiq" in bench.workers:
        actor = bench.dramatiq_actors.limited

        def dramatiq_batch(tag: str) -> int:
            for _ in range(n_dramatiq):
                actor.send_with_options(args=(ms, tag, limit), min_backoff=max(1, int(ms)))
            return n_dramatiq

        variants["dramatiq"] = (bench.worker("dramatiq"), dramatiq_batch, n_dramatiq)

    util: dict[str, list[float]] = defaultdict(list)
    wasted: dict[str, list[float]] = defaultdict(list)
    facts = {
        name: {"limit": limit, "calls_sent": 0, "calls_completed": 0, "peak_running": 0}
        for name in GATE_VARIANTS
    }
    for rep in range(opts.reps):
        for name in rotated(list(variants), rep):
            worker, submit, calls = variants[name]
            gate_worker = name in facts
            refused_before = _count_refused(worker.log) if gate_worker else 0
            batch: Batch = bench.run_batch(worker, f"util{ms:g}-{name}", submit, timeout * 3)
            if gate_worker:
                bench.wait_idle("limited", layout=GATE_VARIANTS[name][1])
                batch.wasted = _count_refused(worker.log) - refused_before
                facts[name]["calls_sent"] += calls
                facts[name]["calls_completed"] += len(batch.records)
                # From the tasks' own start/end times: a lower bound of the units held.
                peak = peak_overlap([(r.start, r.end) for r in batch.records])
                facts[name]["peak_running"] = max(facts[name]["peak_running"], peak)
            util[name].append(batch.throughput / ideal)
            wasted[name].append(1000.0 * batch.wasted / calls)
    gate_facts = facts["gate"]

    label = f"2 utilisation {ms:g} ms"
    gate_vs_relay = ratio_of(util["gate"], util["relay"])
    shared_vs_relay = ratio_of(util["gate-shared"], util["relay"])
    prefetch_vs_relay = ratio_of(util["gate-prefetch"], util["relay"])
    # Issue 15: >= 0.90 of N/d at 10 ms (what a dedicated worker reaches), >= 0.95 at 100 ms.
    bound = 0.95 if ms >= 100 else 0.90
    rows = [
        Row(label, f"relay ceiling: {limit} chains of plain tasks, / (N/d)", _u(util["relay"])),
        Row(
            label,
            f"celery_semaphore (limit {limit}, -c {opts.concurrency}), / (N/d)",
            _u(util["gate"], wasted["gate"]),
            f">= {bound:.2f}",
            verdict(Spread(util["gate"]).median >= bound),
            facts=gate_facts,
        ),
        Row(
            label,
            "celery_semaphore, one Redis (broker push), / (N/d)",
            _u(util["gate-shared"], wasted["gate-shared"]),
            f">= {bound:.2f}",
            verdict(Spread(util["gate-shared"]).median >= bound),
            facts=facts["gate-shared"],
        ),
        Row(
            label,
            f"celery_semaphore, one Redis, prefetch {bench.cluster.prefetch_of('prefetch')}, "
            "/ (N/d)",
            _u(util["gate-prefetch"], wasted["gate-prefetch"]),
            f">= {bound:.2f}",
            verdict(Spread(util["gate-prefetch"]).median >= bound),
            facts=facts["gate-prefetch"],
        ),
        Row(
            label,
            "celery_semaphore: most calls running at once (task timestamps) / limit",
            f"{gate_facts['peak_running']} / {limit}",
            "== limit",
            verdict(gate_facts["peak_running"] == limit),
        ),
        _vs_relay(label, "celery_semaphore / relay ceiling", gate_vs_relay, ms),
        _vs_relay(label, "celery_semaphore, one Redis / relay ceiling", shared_vs_relay, ms),
        _vs_relay(label, "celery_semaphore, prefetch / relay ceiling", prefetch_vs_relay, ms),
        Row(label, f"dedicated worker -c {limit}, / (N/d)", _u(util["c4"], wasted["c4"])),
        Row(
            label,
            "in-task Redis semaphore + self.retry(), / (N/d)",
            _u(util["in-task"], wasted["in-task"]),
            "reference: 0.45-0.49 at 10 ms" if ms <= 10 else "reference: 0.88",
        ),
    ]
    if "dramatiq" in variants:
        rows.append(
            Row(
                label,
                f"Dramatiq ConcurrentRateLimiter ({n_dramatiq} calls), / (N/d)",
                _u(util["dramatiq"], wasted["dramatiq"]),
                "reference: 0.10-0.13 at 10 ms" if ms <= 10 else "reference: 0.19",
            )
        )
    return rows


def _vs_relay(label: str, figure: str, ratio: Spread, ms: float) -> Row:
    # Judged at 10 ms (issue 15: >= 0.90 of the relay ceiling); information at longer tasks.
    if ms > 10:
        return Row(label, figure, ratio.format(), "—", "info")
    return Row(label, figure, ratio.format(), ">= 0.90", verdict(ratio.median >= 0.90))


def _u(util: list[float], wasted: list[float] | None = None) -> str:
    text = Spread(util).format()
    if wasted is not None:
        w = Spread(wasted)
        text += (
            f"; wasted attempts {w.format('{:.0f}')}/1000 calls" if not math.isnan(w.median) else ""
        )
    return text


def _count_refused(log: Any) -> int:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return 0
    return sum(text.count(marker) for marker in _REFUSED)
