"""Scenarios 5 (Redis cost per gated call) and 6 (worker memory).

Redis cost is read on the slots server, which carries no broker traffic: ``INFO
commandstats`` deltas give every command, including those run inside the Lua scripts, and a
``MONITOR`` running during the batch tells client round trips (top-level commands) from
commands run by the scripts. Both cover a call's whole life: the submitter's ``acquire``, the
worker's ``start`` and ``release`` (with its hand-off), and any keepalive that fell inside.

Memory is read from ``/proc`` for two fresh workers, with and without the extension, that
run the same calls side by side: the peak is the kernel's ``VmHWM`` (peak RSS) of the
largest worker process, growth is the change of ``Pss`` summed over the worker's processes.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter
from typing import Any

import redis

from .cluster import memory_kib
from .harness import Bench, BenchError
from .proj import gated_task_name
from .report import Row, verdict
from .stats import Spread

__all__ = ["CommandCounter", "memory", "redis_cost"]


class CommandCounter(threading.Thread):
    """Counts the commands a Redis server runs while it listens (``MONITOR``).

    ``counts[("client" | "lua", command)]``; the stop marker and ``INFO`` are not counted.
    """

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        # The marker goes through a connection opened now, so its handshake (HELLO, CLIENT
        # SETINFO) is not counted as traffic of the calls under test.
        self.stopper = redis.Redis.from_url(url, single_connection_client=True)
        self.stopper.ping()
        self.marker = f"bench-stop-{uuid.uuid4().hex}"
        self.counts: Counter[tuple[str, str]] = Counter()
        self.listening = threading.Event()

    def run(self) -> None:
        """Count until the stop marker goes by."""
        with self.client.monitor() as monitor:
            self.listening.set()
            for command in monitor.listen():
                text = command["command"]
                if self.marker in text:
                    return
                name = text.split(" ", 1)[0].lower()
                if name not in ("info", "monitor"):
                    source = "lua" if command["client_type"] == "lua" else "client"
                    self.counts[(source, name)] += 1

    def stop(self) -> None:
        """Send the stop marker and wait for the thread."""
        self.stopper.echo(self.marker)
        self.join(30)
        self.stopper.close()


def _commandstats(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter(
        {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if "info" not in k}
    )


def _cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def redis_cost(bench: Bench) -> list[Row]:
    """Scenario 5: round trips, commands and Redis CPU per gated call, free and full gate."""
    opts = bench.options
    n = opts.calls(200, 10)
    worker = bench.worker("gated")
    app = bench.gate_app()
    slots = redis.Redis.from_url(bench.cluster.urls["slots"])
    rows: list[Row] = []
    # free: calls sent while the worker runs, the common path (a slot is free at submit).
    # full: the batch is queued first, so all but `limit` calls are parked and handed off.
    for gate, pause, what in (
        ("free", False, "free gate"),
        ("limited", True, f"full gate (limit {opts.limit})"),
    ):
        task = app.tasks[gated_task_name(gate)]
        facts: dict[str, Any] = {"gate": gate, "calls_sent": 0, "calls_completed": 0}

        def batch(
            label: str,
            count: int,
            task: Any = task,
            pause: bool = pause,
            facts: dict[str, Any] = facts,
        ) -> None:
            def submit(tag: str) -> int:
                for _ in range(count):
                    task.apply_async((0, tag), queue=worker.queue)
                return count

            done = bench.run_batch(worker, label, submit, 60 + count * 0.05, pause=pause)
            facts["calls_sent"] += count
            facts["calls_completed"] += len(done.records)
            # The release runs just after the task's record; give the last one time to land
            # instead of polling the slots server, which would count as traffic.
            time.sleep(0.5)

        # Warm-up: scripts loaded in both processes, connections open.
        batch(f"cost-warmup-{gate}", 20)
        bench.wait_idle(gate)
        # Commands and CPU without MONITOR, which costs the server CPU of its own.
        commands: list[float] = []
        cpu_us: list[float] = []
        delta: Counter[str] = Counter()
        for rep in range(opts.reps):
            before, cpu_before = _commandstats(slots), _cpu_s(slots)
            batch(f"cost-{gate}-{rep}", n)
            delta = _commandstats(slots) - before
            cpu_us.append((_cpu_s(slots) - cpu_before) / n * 1e6)
            commands.append(sum(delta.values()) / n)
            bench.wait_idle(gate)
        # Round trips: the top-level commands MONITOR sees during one more batch.
        counter = CommandCounter(bench.cluster.urls["slots"])
        counter.start()
        counter.listening.wait(10)
        try:
            batch(f"cost-monitor-{gate}", n)
        finally:
            counter.stop()
        bench.wait_idle(gate)
        client_calls = Counter({c: k for (s, c), k in counter.counts.items() if s == "client"})
        client_calls.pop("echo", None)  # the counter's stop marker
        trips = sum(client_calls.values()) / n
        top = ", ".join(f"{c} {k / n:.2f}" for c, k in delta.most_common(6))
        label = "5 Redis cost"
        rows += [
            Row(
                label,
                f"round trips per call, {what} ({n} calls)",
                f"{trips:.3f} ({', '.join(f'{c} {k / n:.2f}' for c, k in client_calls.items())})",
                "<= 3, each one script",
                verdict(trips <= 3.0 and set(client_calls) <= {"evalsha"}),
                facts=facts,
            ),
            Row(
                label,
                f"commands per call (scripts included), {what}",
                f"{Spread(commands).format('{:.1f}')}; top: {top}",
            ),
            Row(
                label,
                f"slots redis-server CPU per call, {what}",
                Spread(cpu_us).format("{:.0f}", " µs"),
            ),
        ]
    return rows


def memory(bench: Bench) -> list[Row]:
    """Scenario 6: peak RSS with and without the extension, and growth over a long run."""
    opts = bench.options
    total = max(opts.memory_calls, 40)
    warmup = max(total // 10, 20)
    segments = 4
    per_segment = max((total - warmup) // segments, 5)
    plain_w, gated_w = bench.worker("mem-plain"), bench.worker("mem-gated")
    plain_task = bench.plain_app().tasks["bench.plain"]
    gated_task = bench.gate_app().tasks[gated_task_name("limited")]

    completed = {"plain": 0, "gated": 0}
    sent = {"each": 0}

    def run(count: int, label: str) -> None:
        sent["each"] += count
        plain_tag, gated_tag = bench.tag(f"{label}-plain"), bench.tag(f"{label}-gated")
        # Interleaved, so both workers run under the same conditions at the same time.
        for _ in range(count):
            plain_task.apply_async((0, plain_tag), queue=plain_w.queue)
            gated_task.apply_async((0, gated_tag), queue=gated_w.queue)
        timeout = 120.0 + count * 0.02
        for key, worker, tag in (("plain", plain_w, plain_tag), ("gated", gated_w, gated_tag)):
            completed[key] += _wait_count(bench, worker, tag, count, timeout)
        bench.wait_idle("limited", timeout=60)
        time.sleep(0.5)  # let both workers settle before reading RSS

    run(warmup, "mem-warmup")
    pss = {"plain": [memory_kib(plain_w.pid)], "gated": [memory_kib(gated_w.pid)]}
    for segment in range(segments):
        run(per_segment, f"mem-{segment}")
        pss["plain"].append(memory_kib(plain_w.pid))
        pss["gated"].append(memory_kib(gated_w.pid))
    peak = {"plain": memory_kib(plain_w.pid, "VmHWM"), "gated": memory_kib(gated_w.pid, "VmHWM")}
    calls = warmup + segments * per_segment
    growth = {k: (v[-1] - v[0]) / 1024.0 for k, v in pss.items()}
    steps = {k: [(b - a) / 1024.0 for a, b in itertools.pairwise(v)] for k, v in pss.items()}
    delta_peak = (peak["gated"] - peak["plain"]) / 1024.0
    extra_growth = growth["gated"] - growth["plain"]
    label = "6 worker memory"
    return [
        Row(
            label,
            f"peak RSS (VmHWM, largest process) without / with the extension ({calls} calls each)",
            f"{peak['plain'] / 1024:.1f} / {peak['gated'] / 1024:.1f} MiB",
        ),
        Row(
            label,
            "peak RSS with - without",
            f"{delta_peak:+.1f} MiB",
            "<= 5 MiB",
            verdict(delta_peak <= 5.0),
            facts={"calls_sent": sent["each"], "calls_completed": completed},
        ),
        Row(
            label,
            f"PSS growth after warm-up ({calls - warmup} calls, {segments} segments) "
            "without / with",
            f"{growth['plain']:+.2f} / {growth['gated']:+.2f} MiB; per segment with: "
            f"{Spread(steps['gated']).format('{:+.2f}', ' MiB')}",
        ),
        Row(
            label,
            f"growth with - without over {calls - warmup} calls",
            f"{extra_growth:+.2f} MiB",
            "no growth (<= 1 MiB) over 100,000 calls",
            verdict(extra_growth <= 1.0) + ("" if calls >= 100_000 else f" (at {calls:,} calls)"),
        ),
    ]


def _wait_count(bench: Bench, worker: Any, tag: str, count: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while bench.probe.llen(tag) < count:
        if not worker.alive():
            raise BenchError(f"worker {worker.name} died:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{worker.name}: not all of {count} calls ran in {timeout:.0f} s")
        time.sleep(0.05)
    done = int(bench.probe.llen(tag))
    bench.probe.delete(tag)
    return done
