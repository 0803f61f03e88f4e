"""``python -m benchmarks``: run the scenarios of issues 5, 9 and 15; print one Markdown table.

Examples::

    python -m benchmarks                         # every scenario, default sizes (a few minutes)
    python -m benchmarks --scenarios 1,3 --reps 5
    python -m benchmarks --memory-calls 100000   # the long memory run
    python -m benchmarks --scenarios 7,8,9 --backlog 1000000   # a million parked calls
    python -m benchmarks --scale 0.05 --reps 1 --memory-calls 400 --no-dramatiq  # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from .cluster import Cluster
from .harness import Bench, Options
from .latency import handoff, submit
from .model import backlog, fairness, stacked
from .report import Row, as_json, conditions, failed_row, render
from .resources import memory, redis_cost
from .throughput import overhead, utilisation
from .user import user
from .user import workers as user_workers
from .workflow import workflow

__all__ = ["main", "parse_options"]

SCENARIOS: dict[int, tuple[str, Callable[[Bench], list[Row]]]] = {
    1: ("1 overhead", overhead),
    2: ("2 utilisation", utilisation),
    3: ("3 hand-off", handoff),
    4: ("4 submit", submit),
    5: ("5 Redis cost", redis_cost),
    6: ("6 worker memory", memory),
    7: ("7 backlog", backlog),
    8: ("8 fairness", fairness),
    9: ("9 stacked", stacked),
    10: ("10 workflow", workflow),
    11: ("11 user", user),
}
#: Scenarios that drive a Group on a redis-server of their own (no worker, no broker); 9 adds
#: an end-to-end figure when the workers run anyway.
GROUP_LEVEL = frozenset({7, 8})
#: Scenarios that also measure the gates in the broker's Redis (worker ``gated-shared``).
SHARED_LAYOUT = frozenset({1, 2, 3, 11})
#: Scenarios that also measure calls held ahead of their grant (worker ``gated-prefetch``).
PREFETCH_LAYOUT = frozenset({2, 3})

NOTES = [
    "Every figure is the median over the repetitions, with the min-max range in brackets; "
    "every ratio pairs variants measured back to back in the same repetition.",
    "Throughput = calls / (last end - first start), timestamps taken inside the tasks; each "
    "batch is queued while its worker does not consume, then released at once.",
    "Utilisation = throughput / (limit / task duration). The relay ceiling is `limit` chains "
    "of plain tasks, each sending its successor at its end: the best any dispatch-on-release "
    "gate can do. Wasted attempts: runs that had to retry (in-task semaphore, Dramatiq) or "
    "that celery_semaphore refused after delivery.",
    "The in-task semaphore retries after --retry-factor task durations ±50 % (Celery's "
    "default countdown is 180 s); "
    "Dramatiq's backoff starts at one task duration, capped at 1 s.",
    "Hand-off and hop are 'next start - previous end' with one slot / one chain, so each start "
    "is caused by exactly the previous end.",
    "Redis cost is read on a redis-server that holds only the slots (the broker is another "
    "one); round trips are the top-level commands seen by MONITOR.",
    "Scenarios 7-9 drive a Group (the Lua scripts) directly on a redis-server of their own; "
    "this process plays the workers: it starts each call handed room and ends the oldest "
    "running one. The backlog's drain step is one release (which hands the freed unit to the "
    "next parked call) plus the start of that call; its reply is checked against the FIFO "
    "order.",
    "The drain's rate is wall clock: it includes this process's own CPU (building and parsing "
    "the pipelines) and whatever else runs on the machine meanwhile. The Redis time per step "
    "(INFO commandstats) is the server's share alone: the figure that would grow if a dispatch "
    "cost more with a longer backlog.",
    "Scenario 10's requirement hop is a node's start - its last requirement's end; net of the "
    "wait for a unit of the gate it runs from the later of that end and the end that freed "
    "the unit the node took (at most `limit` run at once, so the i-th start took the unit of "
    "the (i - limit)-th end). Its canvas is chain(group(layer 1), ..., group(layer L)), which "
    "Celery runs as nested chords, on a plain worker with -c limit and a Redis result backend.",
    "Scenario 11 is the user's view: the harness sends the calls one by one while the worker "
    "consumes, and the time runs from just before the first submit to the last call's record "
    "(its end stamp, taken just before the RPUSH); the relay ceiling is timed the same way. "
    "'One Redis': broker, records and gates on one redis-server, the gates in the broker's "
    "database; 'two Redis': the gates on a redis-server of their own, as in every other "
    "scenario. Scenario 4's 'one Redis' row times the same free-slot .delay() with the gates "
    "in the broker's database.",
]


def parse_options(argv: Sequence[str] | None = None) -> tuple[Options, argparse.Namespace]:
    """Parse the command line into :class:`Options` (and the raw namespace)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--scenarios", default="1,2,3,4,5,6,7,8,9,10,11", help="comma-separated, 1-11"
    )
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each figure")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every call count")
    parser.add_argument(
        "--memory-calls", type=int, default=20_000, help="calls of the memory run (100000: long)"
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=20_000,
        help="calls parked behind a full gate in scenario 7 (1000000: the long run)",
    )
    parser.add_argument(
        "--backlog-message", type=int, default=256, help="bytes of each parked message (7)"
    )
    parser.add_argument(
        "--backlog-keys",
        type=int,
        default=1,
        help="spread the backlog over this many keys, a lane each (7; default 1: one lane)",
    )
    parser.add_argument("--limit", type=int, default=4, help="limit of the gate under test")
    parser.add_argument("--concurrency", type=int, default=8, help="worker concurrency")
    parser.add_argument("--pool", choices=("threads", "prefork"), default="threads")
    parser.add_argument("--durations", default="10,100", help="task durations of scenario 2, ms")
    parser.add_argument(
        "--no-dramatiq", action="store_true", help="skip Dramatiq even if installed"
    )
    parser.add_argument(
        "--retry-factor",
        type=float,
        default=1.0,
        help="countdown of the in-task semaphore's self.retry(), in task durations (±50 %%)",
    )
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    parser.add_argument(
        "--json", type=Path, help="write the rows with their facts (counts, peaks) as JSON"
    )
    parser.add_argument("--logs", type=Path, help="keep worker logs in this folder")
    args = parser.parse_args(argv)
    try:
        scenarios = tuple(sorted({int(s) for s in args.scenarios.split(",") if s.strip()}))
        durations = tuple(float(d) for d in args.durations.split(",") if d.strip())
    except ValueError:
        parser.error("--scenarios and --durations take comma-separated numbers")
    if not set(scenarios) <= set(SCENARIOS):
        parser.error(f"--scenarios: choose among {sorted(SCENARIOS)}")
    if (
        min(args.reps, args.limit, args.concurrency, args.backlog) < 1
        or min(args.scale, args.retry_factor) <= 0
    ):
        parser.error(
            "--reps, --scale, --limit, --concurrency, --retry-factor, --backlog must be positive"
        )
    options = Options(
        scenarios=scenarios,
        reps=args.reps,
        scale=args.scale,
        memory_calls=args.memory_calls,
        limit=args.limit,
        concurrency=args.concurrency,
        pool=args.pool,
        durations_ms=durations,
        dramatiq=not args.no_dramatiq and _dramatiq_available(),
        retry_factor=args.retry_factor,
        backlog=args.backlog,
        backlog_message=max(0, args.backlog_message),
        backlog_keys=max(1, args.backlog_keys),
    )
    return options, args


def _dramatiq_available() -> bool:
    try:
        import dramatiq  # noqa: F401
        from dramatiq.rate_limits import ConcurrentRateLimiter  # noqa: F401
    except ImportError:
        return False
    return True


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into SystemExit so the finally blocks stop every worker and server.
    raise SystemExit(128 + signum)


def _scenario_workers(bench: Bench, number: int) -> list[str]:
    """Start the workers ``number`` needs beyond the shared ones; returns their names."""
    opts = bench.options
    if number == 2:
        bench.start_workers({"c4": {"gated": False, "concurrency": opts.limit}})
        started = ["c4"]
        if opts.dramatiq:
            _start_dramatiq(bench)
            started.append("dramatiq")
        return started
    if number == 6:
        bench.start_workers({"mem-plain": {"gated": False}, "mem-gated": {"gated": True}})
        return ["mem-plain", "mem-gated"]
    if number == 10:
        # The canvas: as many at once as the gate allows, and a result backend for the chords.
        bench.start_workers(
            {"canvas": {"gated": False, "concurrency": opts.limit, "results": True}}
        )
        return ["canvas"]
    if number == 11:
        specs = {k: v for k, v in user_workers().items() if k not in bench.workers}
        bench.start_workers(specs)
        return list(specs)
    return []


def _start_dramatiq(bench: Bench) -> None:
    from .dramatiq_app import create_actors

    cluster = bench.cluster
    actors = create_actors(
        cluster.urls["dramatiq"], cluster.urls["slots"], cluster.urls["probe"], cluster.prefix
    )
    bench.dramatiq_actors = actors
    bench.workers["dramatiq"] = worker = cluster.dramatiq_worker(
        "dramatiq", concurrency=bench.options.concurrency
    )
    tag = bench.tag("dramatiq-ping")
    deadline = time.monotonic() + 60
    actors.ping.send(tag)
    while not bench.probe.llen(tag):
        if not worker.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the Dramatiq worker did not start:\n{worker.log_tail()}")
        time.sleep(0.05)


def run(options: Options, logs: Path | None = None) -> tuple[list[Row], list[str]]:
    """Run the chosen scenarios; returns the rows and the condition lines."""
    load_before = os.getloadavg()
    rows: list[Row] = []
    needs_workers = not set(options.scenarios) <= GROUP_LEVEL
    with contextlib.ExitStack() as stack:
        cluster = None
        if needs_workers:
            cluster = stack.enter_context(Cluster(options.limit, options.free_limit, workdir=logs))
        bench = Bench(options, cluster)
        if cluster is not None:
            base: dict[str, dict[str, Any]] = {"plain": {"gated": False}, "gated": {"gated": True}}
            if set(options.scenarios) & SHARED_LAYOUT:
                # The gates in the broker's Redis: grants push the messages themselves.
                base["gated-shared"] = {"gated": True, "layout": "shared"}
            if set(options.scenarios) & PREFETCH_LAYOUT:
                base["gated-prefetch"] = {"gated": True, "layout": "prefetch"}
            bench.start_workers(base)
        for number in options.scenarios:
            label, scenario = SCENARIOS[number]
            extra: list[str] = []
            started = time.monotonic()
            try:
                extra = _scenario_workers(bench, number)
                rows += scenario(bench)
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                rows.append(failed_row(label, exc))
            finally:
                for name in extra:
                    worker = bench.workers.pop(name, None)
                    if worker is not None and cluster is not None:
                        cluster.stop_worker(worker)
            print(f"[{label}: {time.monotonic() - started:.0f} s]", file=sys.stderr, flush=True)
        workdir = cluster.workdir if cluster is not None else None
    if workdir is not None and any(row.verdict == "failed" for row in rows):
        print(f"worker logs kept in {workdir}", file=sys.stderr)
    elif logs is None and workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
    settings = {
        "pool": options.pool,
        "concurrency": options.concurrency,
        "limit": options.limit,
        "reps": options.reps,
        "scale": options.scale,
        "memory calls": options.memory_calls,
        "dramatiq": "yes" if options.dramatiq else "no (not installed or --no-dramatiq)",
        "in-task retry factor": options.retry_factor,
        "backlog": options.backlog,
        "backlog keys": options.backlog_keys,
    }
    return rows, conditions(settings, load_before)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (1 when a scenario failed)."""
    options, args = parse_options(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not in the main thread
            signal.signal(signum, _raise_exit)
    started = time.monotonic()
    rows, lines = run(options, args.logs)
    lines.append(f"wall time: {time.monotonic() - started:.0f} s")
    text = "\n".join(f"- {line}" for line in lines) + "\n\n" + render(rows, NOTES)
    print(text)
    if args.output:
        args.output.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(as_json(rows, lines), indent=1, default=str))
    return 1 if any(row.verdict == "failed" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
