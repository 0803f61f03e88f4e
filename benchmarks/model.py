"""Scenarios 7 (a backlog of parked calls), 8 (fairness between keys) and 9 (stacked gates).

These drive a :class:`~celery_semaphore.Group` directly, against a ``redis-server`` of their
own that nothing else uses, with no Celery worker or broker in the way: they measure the
data model (the Lua scripts), not Celery. Each "worker" here is this process: it starts a
call that was handed room (``Group.start``), and ends it (``Group.release``), which hands the
freed unit on in the same script.

Backlog: the gate is filled, then ``N`` calls are parked with pipelined ``EVALSHA`` of the
acquire script (the script a real submit runs). The drain then releases the oldest holder
and starts the call it handed room to, step by step, pipelined in batches: in one lane the
grant order is known in advance (first in, first out), and every reply is checked against
it. The rate of the first and of the last window of the drain tells whether a dispatch costs
the same with a million calls behind it as with a few (it should: O(log n) per step).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from celery_semaphore import runtime_for
from celery_semaphore.group import Acquired, Group, Started
from celery_semaphore.scripts import Scripts
from celery_semaphore.server import start_private_redis

from .calls import acquire, call_json
from .harness import Bench, BenchError, rotated
from .proj import gated_task_name
from .report import Row, verdict
from .stats import Spread, ratio_of

__all__ = ["backlog", "fairness", "stacked"]

#: Lease of every call made here: longer than any run, so nothing expires mid-measurement.
LEASE_S = 3600.0
#: Steps per pipeline in the drain, calls per pipeline when parking.
PIPELINE = 500


@contextmanager
def _private_group(name: str) -> Iterator[tuple[redis.Redis, Group]]:
    """A group on a fresh redis-server of its own, stopped at the end."""
    server = start_private_redis()
    try:
        client = redis.Redis.from_url(server.url)
        # No history kept: these scenarios count what the gate model itself leaves behind; the
        # end-to-end scenarios run with the default semaphore_history_ttl.
        yield client, Group(client, Scripts(client), name, prefix="bench", history_s=0)
    finally:
        server.stop()


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _script_usec(client: redis.Redis) -> float:
    """Microseconds the server spent in EVALSHA so far (``INFO commandstats``)."""
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return float(stats.get("usec", 0))


def _args(group: Group, *args: Any) -> list[Any]:
    # What Group._run sends: now ("" = Redis TIME), the epoch seen, recovery ms, history ms;
    # then the args.
    return ["", group.epoch, group.recover_ms, group.history_ms, *args]


def park_many(
    client: redis.Redis,
    group: Group,
    ids: list[str],
    body: str | list[str],
    limits: str,
    message: bytes,
) -> None:
    """Park ``ids`` (the gate must be full) with pipelined EVALSHA of the acquire script.

    ``body`` is the call's JSON record, or a list of them taken in turn (call ``i`` gets
    ``body[i % len(body)]``: calls spread over keys).

    Raises:
        BenchError: a call was not parked.
    """
    script = group.scripts.acquire
    bodies = [body] if isinstance(body, str) else body
    for at in range(0, len(ids), PIPELINE):
        pipe = client.pipeline(transaction=False)
        for i, task_id in enumerate(ids[at : at + PIPELINE], at):
            args = _args(group, task_id, bodies[i % len(bodies)], limits, 0, message, "")
            script(keys=group._keys, args=args, client=pipe)
        for task_id, reply in zip(ids[at : at + PIPELINE], pipe.execute(), strict=True):
            if int(reply[1]) != Acquired.PARKED:
                raise BenchError(f"call {task_id} was not parked: {reply[:3]!r}")


def _drain_pipelined(
    client: redis.Redis, group: Group, holders: list[str], parked: list[str], start: int, stop: int
) -> None:
    """Steps ``start..stop-1``: release the oldest holder, start the call it handed room to.

    In one FIFO lane step ``j`` releases ``holders[j]`` and hands room to ``parked[j]``,
    so a whole batch is sent at once and each reply is checked against that order. Calls
    parked over K keys in turn (call ``i`` of key ``i % K``) come out in the same order: the
    lanes are served round robin, each in the order its first call parked.

    Raises:
        BenchError: a release freed nothing or handed room to another call than expected.
    """
    release, begin = group.scripts.release, group.scripts.start
    window_ms = int(group.dedupe_window_s * 1000)
    pipe = client.pipeline(transaction=False)
    for j in range(start, stop):
        # The release script's arguments as Group.release sends them: id, fence, window,
        # state, payload, text.
        args = _args(group, holders[j], "", window_ms, "SUCCEEDED", "", "")
        release(keys=group._keys, args=args, client=pipe)
        begin(keys=group._keys, args=_args(group, parked[j], "bench", 0), client=pipe)
    replies = pipe.execute()
    for j in range(start, stop):
        rel, sta = replies[2 * (j - start)], replies[2 * (j - start) + 1]
        granted = [g[0].decode() for g in rel[4:]]
        if int(rel[1]) != 1 or granted != [parked[j]] or int(sta[1]) != Started.RUN:
            raise BenchError(
                f"drain step {j}: release of {holders[j]} -> {rel[:5]!r}, start of {parked[j]} "
                f"-> {sta[:2]!r}"
            )


def _drain_sequential(group: Group, holders: list[str], parked: list[str], j: int) -> None:
    """Step ``j`` one round trip at a time, as a worker does it: release, then start."""
    out = group.release(holders[j])
    if not out.released or [g.task_id for g in out.grants] != [parked[j]]:
        raise BenchError(f"drain step {j}: release handed room to {out.grants!r}")
    verdict_ = group.start(parked[j], "bench")[0]
    if verdict_ is not Started.RUN:
        raise BenchError(f"drain step {j}: start of {parked[j]} -> {verdict_!r}")


def backlog(bench: Bench) -> list[Row]:
    """Scenario 7: park N calls behind a full gate, then drain them; cost per call at scale."""
    opts = bench.options
    n = max(opts.backlog, 100)
    limit = opts.limit
    window = min(10_000, max(n // 10, 10))
    seq_window = min(1_000, window)
    gate = "backlog"
    message = b"x" * opts.backlog_message
    keys = max(1, opts.backlog_keys)
    body: str | list[str] = call_json([gate], lease_s=LEASE_S)
    if keys > 1:
        body = [call_json([gate], keys=[f"k{k}"], lease_s=LEASE_S) for k in range(keys)]
    with _private_group(gate) as (client, group):
        fillers = [f"fill-{i}" for i in range(limit)]
        for task_id in fillers:
            outcome, *_ = acquire(group, task_id, [gate], [limit], lease_s=LEASE_S)
            if outcome is not Acquired.GRANTED:
                raise BenchError(f"filler {task_id}: {outcome!r}")
            group.start(task_id, "bench")
        ids = [f"call-{i:07d}" for i in range(n)]
        memory_before = _used_memory(client)
        t0 = time.perf_counter()
        park_many(client, group, ids, body, str(limit), message)
        park_s = time.perf_counter() - t0
        memory_per_call = (_used_memory(client) - memory_before) / n
        parked_count = group.parked()
        if parked_count != n:
            raise BenchError(f"{parked_count} calls parked, {n} sent")
        # The tick's script with the whole backlog behind a full gate: it must hand out
        # nothing and cost what it costs on an empty queue.
        tick_ms = []
        for _ in range(20):
            t = time.perf_counter()
            outcome = group.reclaim()
            tick_ms.append((time.perf_counter() - t) * 1000)
            if outcome.grants or outcome.reclaimed:
                raise BenchError(f"the tick changed a full gate: {outcome!r}")
        peaks = [group.used(gate)]
        # Holder of step j: the fillers first, then the parked calls in their order.
        holders = fillers + ids
        # Windows measured one round trip at a time (a worker's view), first and last.
        seq_rates = []
        done = 0

        def sequential(count: int) -> float:
            nonlocal done
            t = time.perf_counter()
            for j in range(done, done + count):
                _drain_sequential(group, holders, ids, j)
            done += count
            return count / (time.perf_counter() - t)

        server_us: list[float] = []  # server time per step (both scripts), per window
        # Per tenth of the drain: [steps, server µs] of its pipelined batches.
        tenths = [[0, 0.0] for _ in range(10)]

        def pipelined(count: int) -> list[float]:
            nonlocal done
            rates = []
            end = done + count
            usec = start_usec = _script_usec(client)
            while done < end:
                step = min(PIPELINE, end - done)
                t = time.perf_counter()
                _drain_pipelined(client, group, holders, ids, done, done + step)
                rates.append(step / (time.perf_counter() - t))
                now_usec = _script_usec(client)
                tenth = tenths[min(9, done * 10 // n)]
                tenth[0] += step
                tenth[1] += now_usec - usec
                usec = now_usec
                done += step
            server_us.append((usec - start_usec) / max(count, 1))
            return rates

        seq_rates.append(sequential(seq_window))
        first = pipelined(window)
        peaks.append(group.used(gate))
        middle_t = time.perf_counter()
        middle = n - done - window - seq_window
        pipelined(middle)
        middle_s = time.perf_counter() - middle_t
        peaks.append(group.used(gate))
        last = pipelined(window)
        seq_rates.append(sequential(seq_window))
        if done != n or group.parked() != 0:
            raise BenchError(f"drain ended after {done} steps with {group.parked()} parked")
        peaks.append(group.used(gate))
        # The last `limit` calls end too; then the group holds nothing.
        completed = done
        for task_id in holders[n:]:
            if not group.release(task_id).released:
                raise BenchError(f"the last holder {task_id} held nothing")
        leftover = sorted(k.decode() for k in client.scan_iter(match="*"))
        at_rest = group.used(gate) == 0 and group.held() == 0
    # The median batch of each window: a scheduler hiccup of this 2-process setup moves one
    # batch, not the figure.
    rate_first, rate_last = Spread(first).median, Spread(last).median
    drift = rate_last / rate_first
    server_drift = server_us[2] / server_us[0]
    by_tenth = [us / steps for steps, us in tenths if steps]
    label = "7 backlog"
    facts = {
        "calls_sent": n,
        "calls_parked": parked_count,
        "calls_completed": completed,
        "limit": limit,
        "peak_used": max(peaks),
        "used_during_drain": peaks,
        "at_rest": at_rest,
        "keys_left": leftover,
        "rate_ratio": drift,
        "keys": keys,
        "server_us_per_step": [server_us[0], server_us[2]],
        "server_us_per_step_by_tenth": by_tenth,
    }
    return [
        Row(
            label,
            f"time to park {n:,} calls behind a full gate (pipelined EVALSHA acquire, "
            f"{PIPELINE} per pipeline"
            + (f"; spread over {keys:,} keys, one lane each)" if keys > 1 else ")"),
            f"{park_s:.1f} s ({n / park_s:,.0f} calls/s)",
            facts=facts,
        ),
        Row(
            label,
            f"Redis memory per parked call (used_memory delta / N; message {len(message)} B)",
            f"{memory_per_call:.0f} B ({memory_per_call - len(message):.0f} B besides the "
            f"message); {memory_per_call * n / 2**20:,.0f} MiB in all",
        ),
        Row(
            label,
            f"tick (Group.reclaim, one round trip) with {n:,} parked calls, median of 20",
            f"{Spread(tick_ms).median:.2f} ms",
        ),
        Row(
            label,
            f"drain: release + start per second, pipelined ({PIPELINE} steps per pipeline; "
            f"median batch), first / last {window:,} steps",
            f"{rate_first:,.0f} / {rate_last:,.0f} /s (middle {middle:,} steps: "
            f"{middle / middle_s if middle_s > 0 else float('nan'):,.0f} /s overall)",
        ),
        Row(
            label,
            "drain: Redis time per step (release + start scripts, INFO commandstats), "
            "first / last window; last / first",
            f"{server_us[0]:.0f} / {server_us[2]:.0f} µs; {server_drift:.2f}",
            "0.80-1.25 (within 20 %)",
            verdict(0.8 <= server_drift <= 1.25),
        ),
        Row(
            label,
            "drain: Redis time per step in each tenth of the drain, the backlog shrinking",
            " / ".join(f"{us:.0f}" for us in by_tenth) + " µs",
        ),
        Row(
            label,
            "drain rate, last / first window",
            f"{drift:.2f}",
            "0.80-1.25 (within 20 %)",
            verdict(0.8 <= drift <= 1.25),
        ),
        Row(
            label,
            f"drain one round trip at a time (Group.release, then Group.start), first / last "
            f"{seq_window:,} steps",
            f"{seq_rates[0]:,.0f} / {seq_rates[1]:,.0f} /s",
        ),
        Row(
            label,
            "peak units held / limit; calls started / parked",
            f"{max(peaks)} / {limit}; {completed:,} / {n:,}",
            "peak == limit, all started",
            verdict(max(peaks) == limit and completed == n and at_rest),
        ),
    ]


def _run_fairness(limit: int, key_limit: int, big: int, small: int) -> dict[str, Any]:
    """One key parks ``big`` calls, a second key then sends ``small``; count the big key's
    grants until the small key's last call started. Calls end oldest first."""
    gate = "fair"
    with _private_group(gate) as (client, group):

        def body(key: str) -> str:
            return call_json([gate], keys=[key], key_limits=[key_limit], lease_s=LEASE_S)

        running: collections.deque[str] = collections.deque()
        started: dict[str, int] = {"big": 0, "small": 0}
        peak = {"gate": 0, "big": 0, "small": 0}

        def note() -> None:
            usage = group.key_usage()
            peak["gate"] = max(peak["gate"], group.used(gate))
            for key in ("big", "small"):
                peak[key] = max(peak[key], usage.get((gate, key), 0))

        def start(task_id: str) -> None:
            verdict_ = group.start(task_id, "bench")[0]
            if verdict_ is not Started.RUN:
                raise BenchError(f"start of {task_id}: {verdict_!r}")
            running.append(task_id)
            started[task_id.split("-")[0]] += 1

        # The big key's first calls take what its key limit allows; the rest park.
        first_parked = big
        for i in range(big):
            task_id = f"big-{i:06d}"
            outcome, *_ = group.acquire(
                task_id, body("big"), [limit], b"m", lease_ms=int(LEASE_S * 1000)
            )
            if outcome is Acquired.GRANTED:
                start(task_id)
            elif outcome is Acquired.PARKED:
                first_parked = i + 1
                break
            else:
                raise BenchError(f"{task_id}: {outcome!r}")
        rest = [f"big-{i:06d}" for i in range(first_parked, big)]
        park_many(client, group, rest, body("big"), str(limit), b"m")
        note()
        big_before = started["big"]
        for i in range(small):
            task_id = f"small-{i:03d}"
            outcome, *_ = group.acquire(
                task_id, body("small"), [limit], b"m", lease_ms=int(LEASE_S * 1000)
            )
            if outcome is Acquired.GRANTED:
                start(task_id)
        note()
        big_at_last_small = None
        steps = 0
        while running:
            out = group.release(running.popleft())
            steps += 1
            if not out.released:
                raise BenchError("a release freed nothing")
            for grant in out.grants:
                start(grant.task_id)
            if steps % 97 == 0 or big_at_last_small is None:
                note()
            if big_at_last_small is None and started["small"] == small:
                big_at_last_small = started["big"] - big_before
        note()
        at_rest = group.used(gate) == 0 and group.held() == 0 and group.parked() == 0
    return {
        "limit": limit,
        "key_limit": key_limit,
        "big_backlog": big,
        "small_calls": small,
        "big_grants_before_small_done": big_at_last_small,
        "bound": small + 2 * limit,
        "calls_sent": big + small,
        "calls_completed": started["big"] + started["small"],
        "peak_used": peak["gate"],
        "peak_key": max(peak["big"], peak["small"]),
        "at_rest": at_rest,
    }


def fairness(bench: Bench) -> list[Row]:
    """Scenario 8: a key with a backlog against a key that sends 10 calls after it."""
    opts = bench.options
    limit = opts.limit
    big = opts.calls(10_000, 100)
    small = 10
    rows = []
    # No key limit (round robin between the keys' lanes alone), one below the gate's, equal.
    variants = [0, max(1, limit // 2), limit]
    label = "8 fairness"
    for key_limit in dict.fromkeys(variants):
        f = _run_fairness(limit, key_limit, big, small)
        ok = (
            f["big_grants_before_small_done"] is not None
            and f["big_grants_before_small_done"] <= f["bound"]
        )
        rows.append(
            Row(
                label,
                f"grants to the big key ({big:,} parked) before the small key's 10th call "
                f"started; gate limit {limit}, "
                + (f"key_limit {key_limit}" if key_limit else "key= without key_limit"),
                f"{f['big_grants_before_small_done']} (calls started {f['calls_completed']:,} / "
                f"{f['calls_sent']:,}; peak {f['peak_used']}, per key {f['peak_key']})",
                f"<= {f['bound']} (10 + 2 x limit)",
                verdict(
                    ok
                    and f["calls_completed"] == f["calls_sent"]
                    and f["peak_used"] == limit
                    and f["peak_key"] == (key_limit or limit)
                    and f["at_rest"]
                ),
                facts=f,
            )
        )
    return rows


def _cycles(
    group: Group, gates: list[str], limits: list[int], n: int, keyed: bool, tag: str
) -> tuple[float, int]:
    """``n`` calls through acquire, start, release, one round trip each.

    Returns calls per second and the number of calls that were granted, ran and freed.
    """
    bodies = [
        call_json(gates, lease_s=LEASE_S)
        if not keyed
        else call_json(gates, keys=[f"tenant-{t}", ""], key_limits=[n, 0], lease_s=LEASE_S)
        for t in range(16 if keyed else 1)
    ]
    lease_ms = int(LEASE_S * 1000)
    done = 0
    t0 = time.perf_counter()
    for i in range(n):
        task_id = f"{tag}-{i}"
        body = bodies[i % len(bodies)]
        outcome, *_ = group.acquire(task_id, body, limits, b"m", lease_ms=lease_ms)
        if outcome is not Acquired.GRANTED:
            raise BenchError(f"{task_id}: {outcome!r}")
        if group.start(task_id, "bench")[0] is not Started.RUN:
            raise BenchError(f"{task_id} did not start")
        if not group.release(task_id).released:
            raise BenchError(f"{task_id} held nothing")
        done += 1
    return n / (time.perf_counter() - t0), done


def stacked(bench: Bench) -> list[Row]:
    """Scenario 9: a per-key stacked gate (key + key_limit, plus a second gate) against a
    plain gate: acquire + start + release per second, at the Group level and end to end."""
    opts = bench.options
    n = opts.calls(2000, 50)
    big = 1_000_000  # limits that never fill: the cost of the common path
    rates: dict[str, list[float]] = collections.defaultdict(list)
    sent = completed = 0
    server = start_private_redis()
    try:
        client = redis.Redis.from_url(server.url)
        scripts = Scripts(client)
        plain_group = Group(client, scripts, "plain", prefix="bench", history_s=0)
        stacked_group = Group(client, scripts, "stacked", prefix="bench", history_s=0)
        variants = {
            "plain": lambda tag: _cycles(plain_group, ["plain"], [big], n, False, tag),
            "stacked": lambda tag: _cycles(stacked_group, ["api", "db"], [big, big], n, True, tag),
        }
        for name, run in variants.items():  # warm-up: scripts loaded, connection open
            run(f"warm-{name}")
        for rep in range(opts.reps):
            for name in rotated(list(variants), rep):
                rate, done = variants[name](f"{name}-{rep}")
                rates[name].append(rate)
                sent += n
                completed += done
        at_rest = all(g.held() == 0 and g.parked() == 0 for g in (plain_group, stacked_group))
        leftover = sorted(k.decode() for k in client.scan_iter(match="*"))
    finally:
        server.stop()
    ratio = ratio_of(rates["stacked"], rates["plain"])
    label = "9 stacked"
    facts: dict[str, Any] = {
        "calls_sent": sent,
        "calls_completed": completed,
        "at_rest": at_rest,
        "keys_left": leftover,
    }
    rows = [
        Row(
            label,
            f"Group level, acquire + start + release per second ({n} calls, one round trip "
            "each): plain gate / per-key stacked gate (2 gates, key + key_limit, 16 keys)",
            f"{Spread(rates['plain']).format('{:.0f}', '/s')} / "
            f"{Spread(rates['stacked']).format('{:.0f}', '/s')}",
        ),
        Row(label, "Group level, stacked / plain", ratio.format(), facts=facts),
    ]
    if bench.cluster is not None and "gated" in bench.workers:
        rows += _stacked_end_to_end(bench, facts)
    return rows


def _stacked_end_to_end(bench: Bench, facts: dict[str, Any]) -> list[Row]:
    """The same comparison through a threads worker: trivial calls, batch released at once."""
    from .throughput import _send_many, _timeout

    opts = bench.options
    n = opts.calls(1000, 20)
    worker = bench.worker("gated")
    app = bench.gate_app()
    runs: dict[str, list[float]] = collections.defaultdict(list)
    plain_task, stacked_task = app.tasks[gated_task_name("free")], app.tasks["bench.stacked"]

    def stacked_batch(tag: str) -> int:
        for i in range(n):
            stacked_task.apply_async((0, tag, f"tenant-{i % 16}"), queue=worker.queue)
        return n

    batches = {
        "plain": lambda tag: _send_many(plain_task, n, (0, tag), worker.queue),
        "stacked": stacked_batch,
    }
    sent = completed = 0
    for rep in range(opts.reps):
        for name in rotated(list(batches), rep):
            batch = bench.run_batch(worker, f"stacked-{name}", batches[name], _timeout(n, 0.002))
            bench.wait_idle("free" if name == "plain" else "sapi")
            runs[name].append(batch.throughput)
            sent += n
            completed += len(batch.records)
    facts["e2e_calls_sent"] = sent
    facts["e2e_calls_completed"] = completed
    # The stacked calls went through both gates of their group (both known to Redis, both
    # free again now).
    group = runtime_for(app).group_of_gate("sapi")  # type: ignore[union-attr]
    gates: Any = group.client.hget(group.keys["state"], "gates") or b""
    facts["e2e_stacked_group"] = group.name
    facts["e2e_stacked_gates"] = sorted(gates.decode().split(","))
    facts["e2e_stacked_used"] = [group.used("sapi"), group.used("sdb")]
    ratio = ratio_of(runs["stacked"], runs["plain"])
    label = "9 stacked"
    return [
        Row(
            label,
            f"end to end, threads worker -c {opts.concurrency}, {n} trivial calls: plain gate / "
            "per-key stacked gate",
            f"{Spread(runs['plain']).format('{:.0f}', '/s')} / "
            f"{Spread(runs['stacked']).format('{:.0f}', '/s')}",
        ),
        Row(label, "end to end, stacked / plain", ratio.format()),
    ]
