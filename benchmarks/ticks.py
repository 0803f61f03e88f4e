"""Issue 14: what one tick costs against idle gates and idle keys, and what a gate, a parked
call and a key cost in Redis memory. Standalone: ``python -m benchmarks.ticks``.

Everything runs on a ``redis-server`` of its own, with no worker or broker in the way. Gates:
an app whose ``semaphore_limits`` name N gates, each of which ran one call (acquire, start,
release at the Group level, pipelined ``EVALSHA``, so its state hash exists); then
``run_tick(runtime)`` of every app in turn, round after round, so a busy machine slows them
alike and each round gives one ratio. Keys: one keyed gate that saw K distinct keys once each.
The issue's target: a tick at 10,000 idle gates within 3x a tick at 10. Each tick's time is
split into its parts as it runs (``Group.reclaim`` and ``Runtime.known_groups`` are timed by
wrappers of this process); ``--profile`` adds cProfile's view of the largest tick.

Memory is Redis ``used_memory`` less client buffers and the script cache (the slow log is
off on this server, so it holds no copies of arguments), and beside it the sum of ``MEMORY
USAGE`` over the keys of the prefix: what the gates themselves keep.

Examples::

    python -m benchmarks.ticks                             # 10, 1,000, 10,000 gates; 100k, 1M keys
    python -m benchmarks.ticks --keys 100000 --ticks 9     # a shorter run
    python -m benchmarks.ticks --gates 10,10000 --profile  # where the time of a tick goes
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import itertools
import pstats
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from unittest import mock

import redis
from celery import Celery

from celery_semaphore import install
from celery_semaphore.due import index_key
from celery_semaphore.group import Acquired, Group, Started
from celery_semaphore.runtime import Runtime
from celery_semaphore.server import start_private_redis
from celery_semaphore.spec import CallSpec
from celery_semaphore.tick import SWEEP, run_tick

__all__ = ["main"]

#: Calls per pipeline (three scripts each: acquire, start, release).
PIPELINE = 200
#: The issue's target: tick(10,000 idle gates) / tick(10 idle gates).
TARGET_RATIO = 3.0
#: Lease of the calls made here: longer than the run, so nothing falls due while measuring.
LEASE_S = 3600.0


def _args(group: Group, *args: Any) -> list[Any]:
    # What Group._run sends first: now ("" = Redis TIME), the epoch seen, recovery ms, history
    # ms; then the script's own arguments.
    return ["", group.epoch, group.recover_ms, group.history_ms, *args]


def _call(gate: str, key: str = "", key_limit: int = 0) -> str:
    """The record a published call of ``gate`` stores (as the publish path builds it)."""
    spec = CallSpec(
        keys=(key,),
        weights=(1,),
        key_limits=(key_limit,),
        priority=0,
        lease_ms=int(LEASE_S * 1000),
        redeliver=False,
    )
    return spec.to_json((gate,), task="bench.ticks")


class Setup:
    """An app on the private Redis whose ``semaphore_limits`` are ``limits``, and its runtime."""

    def __init__(self, base_url: str, prefix: str, limits: dict[str, int]) -> None:
        self.app = Celery(f"ticks-{prefix}", broker=f"{base_url}/1", set_as_current=False)
        self.app.conf.update(
            semaphore_redis_url=f"{base_url}/0",
            semaphore_key_prefix=prefix,
            semaphore_limits=limits,
            semaphore_lease=LEASE_S,
            semaphore_tick_interval=1.0,
            # The gate model alone: an ended call's history (kept for semaphore_history_ttl,
            # an hour by default) is measured on a row of its own.
            semaphore_history_ttl=0,
        )
        self.rt: Runtime = install(self.app)
        self.client: redis.Redis = self.rt.client

    def cycle(self, calls: Iterable[tuple[str, str, str, str]]) -> int:
        """Run each ``(group, call id, call json, limits)`` through acquire, start and release,
        pipelined; every reply is checked. Returns how many calls ran.

        Raises:
            RuntimeError: a call was not granted, started or released.
        """
        scripts = self.rt.scripts
        calls = iter(calls)
        done = 0
        while batch := list(itertools.islice(calls, PIPELINE)):
            done += len(batch)
            pipe = self.client.pipeline(transaction=False)
            for name, task_id, body, limits in batch:
                group = self.rt.group(name)
                keys = group._keys
                acquire = _args(group, task_id, body, limits, 0, b"m", "")
                scripts.acquire(keys=keys, args=acquire, client=pipe)
                scripts.start(keys=keys, args=_args(group, task_id, "bench", 0), client=pipe)
                release = _args(group, task_id, "", 60_000, "SUCCEEDED", "", "")
                scripts.release(keys=keys, args=release, client=pipe)
            replies = pipe.execute()
            for i, (_, task_id, _, _) in enumerate(batch):
                acq, sta, rel = replies[3 * i : 3 * i + 3]
                if (int(acq[1]), int(sta[1]), int(rel[1])) != (Acquired.GRANTED, Started.RUN, 1):
                    raise RuntimeError(f"call {task_id}: {acq[:3]!r} {sta[:2]!r} {rel[:2]!r}")
        return done

    def park(self, name: str, count: int, message: bytes) -> None:
        """Fill gate ``name`` (limit 1) with one holder, then park ``count`` calls behind it."""
        group = self.rt.group(name)
        body = _call(name)
        holder = group.acquire("holder", body, [1], b"m", lease_ms=int(LEASE_S * 1000))
        if holder.outcome is not Acquired.GRANTED:
            raise RuntimeError(f"the holder of {name!r} was not granted: {holder!r}")
        for at in range(0, count, PIPELINE):
            pipe = self.client.pipeline(transaction=False)
            for i in range(at, min(at + PIPELINE, count)):
                args = _args(group, f"parked-{i:08d}", body, "1", 0, message, "")
                self.rt.scripts.acquire(keys=group._keys, args=args, client=pipe)
            for reply in pipe.execute():
                if int(reply[1]) != Acquired.PARKED:
                    raise RuntimeError(f"a call was not parked: {reply[:3]!r}")

    def memory(self) -> int:
        """Bytes of data: ``used_memory`` less client buffers and the script cache, once the
        server has settled (it frees the buffers of a pipeline a moment after it ran)."""
        last = -1
        for _ in range(20):
            m = self.client.info("memory")
            now = int(m["used_memory"]) - int(m["mem_clients_normal"])
            now -= int(m["used_memory_scripts"])
            if now == last:
                break
            last = now
            time.sleep(0.3)
        return last

    def dbsize(self) -> int:
        return int(self.client.dbsize())

    def kept(self) -> int:
        """Bytes the keys of this app's prefix hold (``MEMORY USAGE``, every element)."""
        prefix = self.rt.settings.key_prefix
        pipe = self.client.pipeline(transaction=False)
        for key in self.client.scan_iter(match=f"{{{prefix}:*", count=1000):
            pipe.memory_usage(key, samples=0)
        return sum(int(n or 0) for n in pipe.execute())


@contextlib.contextmanager
def timing_parts(parts: dict[str, float]) -> Iterator[None]:
    """Add the milliseconds spent in ``Group.reclaim`` and ``Runtime.known_groups`` to
    ``parts`` while the block runs (wrappers in this process; the package is unchanged)."""

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[name] += (time.perf_counter() - t) * 1000

        return wrapper

    with (
        mock.patch.object(Group, "reclaim", timed("reclaim", Group.reclaim)),
        mock.patch.object(Runtime, "known_groups", timed("known_groups", Runtime.known_groups)),
    ):
        yield


class TickCost:
    """The ticks of one app: times, groups visited, and time in reclaims and known_groups."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.times: list[float] = []
        self.visits: list[int] = []
        self.parts: list[dict[str, float]] = []

    def tick(self) -> None:
        parts: dict[str, float] = defaultdict(float)
        with timing_parts(parts):
            t = time.perf_counter()
            summary = run_tick(self.setup.rt)
            self.times.append((time.perf_counter() - t) * 1000)
        self.visits.append(len([g for g in summary if g != "recurring"]))
        self.parts.append(parts)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def part(self, name: str) -> float:
        return statistics.median(p[name] for p in self.parts)

    def spread(self) -> str:
        return f"{self.median:.2f} ({min(self.times):.2f}-{max(self.times):.2f})"

    def indexed(self) -> int:
        """Groups in the tick's due index (0 when every gate is idle)."""
        return int(self.setup.client.zcard(index_key(self.setup.rt.settings.key_prefix)))


def measure_rounds(costs: Sequence[TickCost], ticks: int) -> None:
    """Tick every app in turn, ``ticks`` rounds (after three untimed ones per app)."""
    for cost in costs:
        for _ in range(3):  # connections, scripts and Group objects made before timing
            run_tick(cost.setup.rt)
    for _ in range(ticks):
        for cost in costs:
            cost.tick()


def _profile(rt: Runtime, ticks: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(ticks):
        run_tick(rt)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    return out.getvalue()


def gates_section(
    base_url: str, counts: Sequence[int], ticks: int, profile: bool, figures: dict[str, str]
) -> list[str]:
    """Tick time against idle gates, the ratio, its parts, and memory per gate at rest."""
    costs: dict[int, TickCost] = {}
    gate_bytes, gate_kept, gate_keys, measured = 0.0, 0.0, 0.0, 0
    for n in counts:
        names = [f"g{i}" for i in range(n)]
        setup = Setup(base_url, f"tk{n}", dict.fromkeys(names, 2))
        setup.cycle([(names[0], "warm", _call(names[0]), "2")])  # scripts loaded first
        before, keys_before, kept_before = setup.memory(), setup.dbsize(), setup.kept()
        setup.cycle((name, f"c-{name}", _call(name), "2") for name in names[1:])
        if n - 1 > measured:
            measured = n - 1
            gate_bytes = (setup.memory() - before) / measured
            gate_kept = (setup.kept() - kept_before) / measured
            gate_keys = (setup.dbsize() - keys_before) / measured
        costs[n] = TickCost(setup)
    measure_rounds(list(costs.values()), ticks)
    low, high = min(counts), max(counts)
    lines = [
        "## Tick time against idle gates",
        "",
        f"{ticks} rounds, each ticking every app once in turn; SWEEP = {SWEEP}.",
        "",
        "| idle gates | tick ms, median (min-max) | groups visited | in Group.reclaim ms "
        "| in known_groups() ms | rest ms | groups in the due index |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n, cost in costs.items():
        reclaim, known = cost.part("reclaim"), cost.part("known_groups")
        lines.append(
            f"| {n:,} | {cost.spread()} | {statistics.median(cost.visits):g} | {reclaim:.2f} "
            f"| {known:.2f} | {cost.median - reclaim - known:.2f} | {cost.indexed()} |"
        )
    ratios = [h / lo for h, lo in zip(costs[high].times, costs[low].times, strict=True)]
    ratio = statistics.median(ratios)
    verdict = "met" if ratio <= TARGET_RATIO else "missed"
    lines += [
        "",
        f"Ratio tick({high:,}) / tick({low:,}), median of the rounds' ratios: **{ratio:.2f}x** "
        f"({min(ratios):.2f}-{max(ratios):.2f}); target within {TARGET_RATIO:g}x: **{verdict}**.",
    ]
    per_visit = costs[high].part("reclaim") / max(statistics.median(costs[high].visits), 1)
    lines.append(
        f"One idle group's reclaim (one EVALSHA round trip): {per_visit:.3f} ms at {high:,} gates."
    )
    if ratio > TARGET_RATIO:
        lines += ["", *what_if(costs[low].setup, costs[high].setup, ticks)]
    if profile:
        lines += ["", f"cProfile of {ticks} ticks at {high:,} idle gates (by own time):", "```"]
        lines += [_profile(costs[high].setup.rt, ticks).rstrip(), "```"]
    figures[f"tick at {low:,} / {high:,} idle gates"] = (
        f"{costs[low].median:.2f} / {costs[high].median:.2f} ms; paired ratio {ratio:.2f}x "
        f"({verdict})"
    )
    if measured:
        figures["a gate at rest"] = (
            f"{gate_bytes:,.0f} bytes of used_memory ({gate_kept:,.0f} of MEMORY USAGE), "
            f"{gate_keys:g} Redis key"
        )
        lines += ["", f"Memory per gate at rest: {figures['a gate at rest']} ({measured:,} gates)."]
    return lines


def what_if(small: Setup, large: Setup, repeat: int) -> list[str]:
    """Where the large tick's extra time goes, and what two other ways of doing the same work
    would cost, measured here with the package unchanged (for the issue's suggestions)."""
    rt = large.rt
    settings = rt.settings
    names = rt.known_groups()[:SWEEP]
    groups = [rt.group(n) for n in names]
    reclaim_args = [
        1000,
        int(settings.dropped_after_s * 1000),
        settings.max_dispatches,
        int(settings.tick_interval_s * 1000),
        int(settings.dedupe_window_s * 1000),
    ]

    def pipelined() -> None:
        pipe = large.client.pipeline(transaction=False)
        for group in groups:
            rt.scripts.reclaim(keys=group._keys, args=_args(group, *reclaim_args), client=pipe)
        pipe.execute()

    def cheap_check() -> None:
        # A read-only look at the slice: the due time each group wrote, one round trip.
        pipe = large.client.pipeline(transaction=False)
        for group in groups:
            pipe.hget(group.keys["state"], "due_at")
        pipe.execute()

    def median(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    known, configured = rt.known_groups(), rt.configured_groups()
    small_rt = small.rt
    small_groups = [small_rt.group(n) for n in small_rt.known_groups()]
    rows = [
        ("the small app's tick: its idle reclaims, one round trip each", len(small_groups),
         median(lambda: [g.reclaim() for g in small_groups])),
        ("the large app's sweep as it is: idle reclaims, one round trip each", len(groups),
         median(lambda: [g.reclaim() for g in groups])),
        ("the same reclaims pipelined: one round trip", len(groups), median(pipelined)),
        ("instead, HGET due_at of the slice, pipelined: one round trip", len(groups),
         median(cheap_check)),
        ("Runtime.configured_groups() (tasks and semaphore_limits, rebuilt each tick)",
         len(rt.configured_groups()), median(rt.configured_groups)),
        ("SMEMBERS of the Semaphore registry", int(large.client.scard(rt.registry_key)),
         median(lambda: large.client.smembers(rt.registry_key))),
        ("sorted() of the known groups", len(known), median(lambda: sorted(configured))),
        ("tick._sweep's (known + known)[start : start + SWEEP]", len(known),
         median(lambda: (known + known)[len(known) // 2 : len(known) // 2 + SWEEP])),
    ]  # fmt: skip
    lines = [
        "What the parts cost, and alternatives (measured here; the package is unchanged):",
        "",
        "| what | groups | ms, median |",
        "|---|---:|---:|",
    ]
    lines += [f"| {what} | {n:,} | {ms:.2f} |" for what, n, ms in rows]
    return lines


def keys_section(
    base_url: str, counts: Sequence[int], ticks: int, figures: dict[str, str]
) -> list[str]:
    """Tick time and memory against the distinct keys one keyed gate saw."""
    gate = "tenants"
    setup = Setup(base_url, "tkkeys", {gate: 1000})
    setup.cycle([(gate, "warm", _call(gate, "warm", 1), "1000")])
    group = setup.rt.group(gate)
    before, keys_before, kept_before = setup.memory(), setup.dbsize(), setup.kept()
    fields_before = int(setup.client.hlen(group.keys["state"]))
    lines = [
        "## Tick time and memory against idle keys (one keyed gate, key limit 1)",
        "",
        "| distinct keys seen | tick ms, median (min-max) | used_memory growth, bytes (per key) "
        "| MEMORY USAGE growth, bytes | Redis keys added | state hash fields added "
        "| usage hash fields | calls/s to make them |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = TickCost(setup)
    measure_rounds([base], ticks)
    lines.append(f"| 0 | {base.spread()} | 0 | 0 | 0 | 0 | 0 | — |")
    done = 0
    for k in sorted(counts):
        t = time.perf_counter()
        calls = ((gate, f"k{i}", _call(gate, f"key-{i:07d}", 1), "1000") for i in range(done, k))
        rate = setup.cycle(calls) / (time.perf_counter() - t)
        done = k
        grown = setup.memory() - before
        cost = TickCost(setup)
        measure_rounds([cost], ticks)
        lines.append(
            f"| {k:,} | {cost.spread()} | {grown:,} ({grown / k:.3f}) "
            f"| {setup.kept() - kept_before:,} | {setup.dbsize() - keys_before} "
            f"| {int(setup.client.hlen(group.keys['state'])) - fields_before} "
            f"| {int(setup.client.hlen(group.keys['usage']))} | {rate:,.0f} |"
        )
        figures["a key at rest (must be 0)"] = (
            f"{grown / k:.3f} bytes of used_memory ({grown:,} for {k:,} keys, gate metric "
            f"buckets included), {setup.dbsize() - keys_before} Redis keys added"
        )
        figures[f"tick at 0 / {k:,} idle keys"] = f"{base.median:.2f} / {cost.median:.2f} ms"
    lines += [
        "",
        "State hash fields added: the gate's metric buckets (wait and hold histograms), bounded "
        "per gate; no field, key or member names a key once its calls ended. used_memory moves "
        "by a few kilobytes whatever is stored (allocator and server bookkeeping); MEMORY USAGE "
        "is what the gate's keys hold.",
    ]
    return lines


def memory_section(base_url: str, count: int, message: int, figures: dict[str, str]) -> None:
    """Bytes per parked call, and per ended call's history (kept for semaphore_history_ttl)."""
    setup = Setup(base_url, "tkpark", {"parked": 1, "history": 1000})
    setup.cycle([("parked", "warm", _call("parked"), "1")])
    before = setup.memory()
    setup.park("parked", count, b"x" * message)
    parked = (setup.memory() - before) / count
    group = setup.rt.group("history")
    group.history_ms = 3_600_000  # the default semaphore_history_ttl
    setup.cycle([("history", "warm", _call("history"), "1000")])
    before = setup.memory()
    setup.cycle(("history", f"h{i:08d}", _call("history"), "1000") for i in range(count))
    history = (setup.memory() - before) / count
    figures[f"a parked call ({message}-byte message)"] = (
        f"{parked:,.0f} bytes ({parked - message:,.0f} beyond the message; {count:,} parked)"
    )
    figures["an ended call's history (semaphore_history_ttl, 1 h by default)"] = (
        f"{history:,.0f} bytes until the TTL ({count:,} calls)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ticks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gates", default="10,1000,10000", help="idle gate counts")
    parser.add_argument("--keys", default="100000,1000000", help="distinct key counts ('' none)")
    parser.add_argument("--ticks", type=int, default=15, help="timed rounds")
    parser.add_argument("--parked", type=int, default=10_000, help="calls parked for memory")
    parser.add_argument("--message", type=int, default=256, help="bytes of a parked message")
    parser.add_argument("--profile", action="store_true", help="cProfile the largest tick")
    opts = parser.parse_args(argv)
    gate_counts = sorted({int(x) for x in opts.gates.split(",") if x})
    key_counts = sorted({int(x) for x in opts.keys.split(",") if x})

    server = start_private_redis()
    try:
        base = server.url.rsplit("/", 1)[0]
        admin = redis.Redis.from_url(server.url)
        # Slow scripts on a busy machine would fill the slow log with copies of their
        # arguments, which used_memory counts: off on this private server.
        admin.config_set("slowlog-log-slower-than", -1)
        admin.slowlog_reset()
        version = admin.info("server")["redis_version"]
        print(f"# Tick scaling (redis-server {version}, private, port {server.port})\n")
        figures: dict[str, str] = {}
        lines = gates_section(base, gate_counts, opts.ticks, opts.profile, figures)
        print("\n".join(lines), flush=True)
        if key_counts:
            print("\n" + "\n".join(keys_section(base, key_counts, opts.ticks, figures)), flush=True)
        memory_section(base, opts.parked, opts.message, figures)
        print("\n## Figures for the README\n\n| what | measured |\n|---|---|")
        print("\n".join(f"| {what} | {value} |" for what, value in figures.items()))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
