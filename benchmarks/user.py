"""Scenario 11: "submit N calls of 10 ms through a gate of 4 and wait for all", as a user sees it.

The harness sends the calls one after the other while the worker consumes (unlike scenarios
1-2, whose batches are queued first and released at once), and the time runs from just before
the first submit to the last call's record. The reference is the relay ceiling measured the
same way: ``limit`` chains of plain tasks (each sends its successor at its end) with the same
number of calls in all, from their first submit to their last record. At 100 ms the figure is
also set against N/d (limit / duration).

Both in each of two layouts: ``shared``, one Redis for everything (the gates in the broker's
database), and ``separate``, the gates on a redis-server of their own (see
:meth:`~benchmarks.cluster.Cluster.gate_home`). The shared layout has a gated and a plain
worker of its own, started for this scenario; the separate layout uses the run's usual ones.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import Any

from .cluster import Worker
from .harness import Bench, Record, rotated
from .proj import gated_task_name
from .report import Row, verdict
from .stats import Spread, peak_overlap, ratio_of

__all__ = ["DURATIONS_MS", "LAYOUTS", "user", "workers"]

#: Durations of the calls, ms: 10 ms is set against the relay ceiling, 100 ms against N/d.
DURATIONS_MS = (10.0, 100.0)

#: Layout -> (gated worker, plain worker, label in the table). The separate layout uses the
#: run's usual workers.
LAYOUTS: dict[str, tuple[str, str, str]] = {
    "shared": ("gated-shared", "plain-shared", "one Redis"),
    "separate": ("gated", "plain", "two Redis"),
}


def workers() -> dict[str, dict[str, Any]]:
    """The worker specs this scenario needs beyond the run's usual ``gated`` and ``plain``."""
    specs: dict[str, dict[str, Any]] = {}
    for layout, (gated_name, plain_name, _) in LAYOUTS.items():
        if layout != "separate":
            specs[gated_name] = {"gated": True, "layout": layout}
            # The relay touches no gate, but a layout's pair of workers is configured alike,
            # so both sides of its ratio run on the same kind of worker.
            specs[plain_name] = {"gated": False, "layout": layout}
    return specs


def user(bench: Bench) -> list[Row]:
    """Scenario 11: a gated batch submitted while consuming, against the relay ceiling."""
    rows: list[Row] = []
    for ms in DURATIONS_MS:
        rows += _user_at(bench, ms)
    return rows


def _user_at(bench: Bench, ms: float) -> list[Row]:
    opts = bench.options
    limit = opts.limit
    per_chain = max(1, opts.calls(400 if ms <= 10 else 80, limit * 5) // limit)
    # A multiple of the limit, so the gate and the relay run exactly as many calls.
    n = per_chain * limit
    ideal = limit / (ms / 1000.0)
    # Generous: a run ten times slower than expected still completes, a stuck one fails.
    timeout = 30.0 + 10.0 * n * ms / 1000.0 / limit
    relay_task = bench.plain_app().tasks["bench.relay"]

    util: dict[tuple[str, str], list[float]] = defaultdict(list)
    facts: dict[str, dict[str, Any]] = {
        layout: {
            "layout": layout,
            "ms": ms,
            "limit": limit,
            "calls_sent": 0,
            "calls_completed": 0,
            "peak_running": 0,
            "relay_calls_sent": 0,
            "relay_calls_completed": 0,
        }
        for layout in LAYOUTS
    }
    for rep in range(opts.reps):
        for layout in rotated(list(LAYOUTS), rep):
            gated_name, plain_name, _ = LAYOUTS[layout]
            gated_w, plain_w = bench.worker(gated_name), bench.worker(plain_name)
            gate_task = bench.gate_app(layout).tasks[gated_task_name("limited")]
            variants = {
                "gate": (
                    gated_w,
                    partial(_send, gate_task, n, ms, gated_w.queue),
                    partial(bench.wait_idle, "limited", layout=layout),
                ),
                "relay": (
                    plain_w,
                    partial(_relay, relay_task, limit, per_chain, ms, plain_w.queue),
                    None,
                ),
            }
            f = facts[layout]
            for variant in rotated(list(variants), rep):
                worker, submit, settle = variants[variant]
                label = f"user{ms:g}-{layout}-{variant}"
                span, records, completed = _timed(bench, worker, label, submit, n, timeout, settle)
                util[layout, variant].append(n / span / ideal if span > 0 else float("nan"))
                if variant == "relay":
                    f["relay_calls_sent"] += n
                    f["relay_calls_completed"] += completed
                    continue
                f["calls_sent"] += n
                f["calls_completed"] += completed
                # From the tasks' own start/end times: a lower bound of the units held.
                peak = peak_overlap([(r.start, r.end) for r in records])
                f["peak_running"] = max(f["peak_running"], peak)

    rows: list[Row] = []
    for layout, (_, _, where) in LAYOUTS.items():
        f = facts[layout]
        gate, relay = util[layout, "gate"], util[layout, "relay"]
        gate_vs_relay = ratio_of(gate, relay)
        rate = Spread([u * ideal for u in gate]).format("{:.0f}", " calls/s")
        label = f"11 user {ms:g} ms, {where}"
        rows += [
            Row(
                label,
                f"relay ceiling, same way: {limit} chains, {n} calls in all, / (N/d)",
                Spread(relay).format(),
            ),
            Row(
                label,
                f"{n} gated calls (limit {limit}, -c {opts.concurrency}) sent while consuming, "
                "first submit -> last record, / (N/d)",
                f"{Spread(gate).format()}; {rate}",
                ">= 0.95" if ms >= 100 else "—",
                verdict(Spread(gate).median >= 0.95) if ms >= 100 else "info",
                facts=f,
            ),
            Row(
                label,
                "gate: most calls running at once (task timestamps) / limit",
                f"{f['peak_running']} / {limit}",
                "== limit",
                verdict(f["peak_running"] == limit),
            ),
            Row(
                label,
                "gate / relay ceiling (same way)",
                gate_vs_relay.format(),
                ">= 0.90" if ms <= 10 else "—",
                verdict(gate_vs_relay.median >= 0.90) if ms <= 10 else "info",
            ),
        ]
    return rows


def _send(task: Any, n: int, ms: float, queue: str, tag: str) -> None:
    # One by one, as a user's loop of .delay() would: each call its own publish.
    for _ in range(n):
        task.apply_async((ms, tag), queue=queue)


def _relay(task: Any, chains: int, per_chain: int, ms: float, queue: str, tag: str) -> None:
    for chain in range(chains):
        task.apply_async((ms, tag, chain, per_chain), queue=queue)


def _timed(
    bench: Bench,
    worker: Worker,
    label: str,
    submit: Callable[[str], None],
    expected: int,
    timeout: float,
    settle: Callable[[], None] | None = None,
) -> tuple[float, list[Record], int]:
    """Send a batch with ``submit(tag)`` while ``worker`` consumes and wait for all of it.

    Returns:
        Seconds from just before the first submit to the last call's record, the records,
        and how many records there were once ``settle()`` returned (a call that ran twice
        shows up there).
    """
    tag = bench.tag(label)
    started = time.time()
    submit(tag)
    records = bench.wait_records(tag, expected, timeout, worker)
    if settle is not None:
        settle()
    completed = int(bench.probe.llen(tag))
    bench.probe.delete(tag)
    # The last record's end stamp is taken in the task just before its RPUSH: the moment
    # the record arrives, without the harness's polling interval (same host, same clock).
    return max(r.end for r in records) - started, records, completed
