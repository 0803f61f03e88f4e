"""The beat task ``celery_semaphore.tick``: the safety net that repairs what signals missed.

Each run, per group: reclaim expired leases, start calls whose time came, hand room to waiting
calls, record the final state of calls that can no longer finish (``CallDropped``,
``NeverStarted``), and let scheduler slots poll their backends. Two ticks at once (two
beats) have the effect of one: every step is one script.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import Celery
from celery.utils.log import get_logger
from kombu.utils import json

from .due import due_groups, settle
from .errors import WaitTimeout
from .group import Reclaimed
from .message import Envelope
from .results import cancel_call, fail_call, record_dropped, record_never_started
from .runtime import Runtime, recurring_keys, runtime_for

__all__ = ["TICK_TASK", "fire_recurring", "register_tick", "run_tick"]

logger = get_logger(__name__)

#: Name of the beat-scheduled task.
TICK_TASK = "celery_semaphore.tick"
#: Groups with something due visited per tick at most (the rest wait for the next one).
DUE_BATCH = 1000
#: Groups the tick looks at per tick besides the due ones (one pipelined read; it visits those
#: that need it): a full pass over N groups takes N / SWEEP ticks.
SWEEP = 20


def run_tick(rt: Runtime) -> dict[str, dict[str, int]]:
    """One tick: the groups with something due (see :mod:`.due`), the scheduler's, and a slice
    of the others; returns counts per group visited."""
    summary: dict[str, dict[str, int]] = {}
    scheduler = rt.scheduler
    backoff_ms = int(rt.settings.tick_interval_s * 1000)
    fired = fire_recurring(rt)
    if fired:
        summary["recurring"] = {"fired": fired}
    prefix = rt.settings.key_prefix
    sec, usec = rt.client.time()
    now_ms = int(sec) * 1000 + int(usec) // 1000
    visits = dict(due_groups(rt.client, prefix, now_ms, DUE_BATCH))
    for name in _sweep(rt, now_ms):
        visits.setdefault(name, "")
    if scheduler is not None:
        for name in scheduler.groups():
            visits.setdefault(name, "")
    for name, seen in visits.items():
        group = rt.group(name)
        outcome = group.reclaim(backoff_ms=backoff_ms)
        if group.cluster:  # on one server the script itself wrote the index
            settle(rt.client, prefix, group.tag, seen, outcome.next_due)
        timed_out = 0
        for row in outcome.reclaimed:
            timed_out += _report(rt, name, row)
        for task_id, runner in outcome.dropped:
            record_dropped(rt.app, name, task_id, runner)
        for task_id, waited_s, message, gate in outcome.expired:
            logger.warning(
                "gate group %r: call %s waited %.1f s, its wait_timeout; it will not run",
                name,
                task_id,
                waited_s,
            )
            fail_call(rt.app, task_id, WaitTimeout(gate, task_id, waited_s), message)
        started = rt.dispatch(name, outcome.grants, outcome.malformed)
        if scheduler is not None:
            started += scheduler.fill(name)
        summary[name] = {"timed_out": timed_out, "started": started}
    return summary


def _sweep(rt: Runtime, now_ms: int) -> list[str]:
    """The groups of the next slice of every group the app knows (round robin; all of them
    while there are at most SWEEP) that need a visit the index did not ask for: one with
    something due by its own ``due_at``, or with calls held, waiting or parked and no
    ``due_at`` at all. One pipelined read; it repairs an index entry lost with a client that
    died between its script and its write (on a cluster), and groups written before the index
    existed."""
    known = rt.known_groups()
    if len(known) > SWEEP:
        start = rt.sweep_cursor % len(known)
        rt.sweep_cursor = start + SWEEP
        known = (known + known)[start : start + SWEEP]
    pipe = rt.client.pipeline(transaction=False)
    for name in known:
        keys = rt.group(name).keys
        # due_at; parked calls (the tick's pump is their safety net); held and delayed ones.
        pipe.hmget(keys["state"], "due_at", "parked")
        pipe.zcard(keys["holders"])
        pipe.zcard(keys["delayed"])
    replies = pipe.execute()
    visit = []
    for i, name in enumerate(known):
        (due_at, parked), held, delayed = replies[3 * i : 3 * i + 3]
        if due_at is not None:
            if int(due_at) <= now_ms:
                visit.append(name)
        elif held or delayed or int(parked or 0):
            visit.append(name)
    return visit


def fire_recurring(rt: Runtime, batch: int = 100) -> int:
    """Send the due occurrences of the recurring schedules; returns how many were sent."""
    keys = recurring_keys(rt.settings.key_prefix)
    sent = 0
    for raw_name, raw, number in rt.scripts.recur_take(keys=keys, args=["", batch]):
        name = raw_name.decode()
        doc = json.loads(raw)
        signature = rt.app.signature(doc["signature"])
        last_id = doc.get("last_id")
        gates = rt.gates_of(signature.task)
        pending = bool(last_id and gates and rt.group(gates.group).record(last_id) is not None)
        if pending and doc["overlap"] == "skip":
            logger.info(
                "recurring %r: occurrence %d skipped, the last one is pending", name, number
            )
            rt.scripts.recur_note(keys=keys, args=[name, ""])
            continue
        if pending and doc["overlap"] == "replace":
            cancel_call(rt, last_id)
        task_id = f"{name}-{number}-{uuid.uuid4().hex[:8]}"
        try:
            signature.clone().apply_async(task_id=task_id)
            sent += 1
        except Exception:
            logger.exception("recurring %r: occurrence %d could not be sent; skipped", name, number)
            task_id = ""
        rt.scripts.recur_note(keys=keys, args=[name, task_id])
    return sent


def _report(rt: Runtime, group: str, row: Reclaimed) -> int:
    if row.state == "lock-expired":
        logger.warning(
            "gate group %r: Semaphore hold %s was granted but never taken (its process died "
            "waiting); its room goes on",
            group,
            row.task_id,
        )
        return 0
    if row.state == "waiting":
        logger.warning(
            "gate group %r: call %s was handed room but never started (%d times); sent again "
            "after the calls behind it",
            group,
            row.task_id,
            row.dispatches,
        )
        return 0
    if row.state == "abandoned":
        queue = "?"
        try:
            envelope = Envelope.decode(row.message)
            queue = (
                envelope.queues[0]
                if envelope.queues
                else str(envelope.publish_kwargs.get("routing_key", "?"))
            )
        except ValueError:
            pass
        logger.error(
            "gate group %r: call %s was sent to queue %r %d times and never started; recorded "
            "as NeverStarted",
            group,
            row.task_id,
            queue,
            row.dispatches,
        )
        record_never_started(rt.app, group, row.task_id, queue, row.dispatches)
        return 0
    logger.warning(
        "gate group %r: the lease of call %s expired (state %s, runner %s); its worker died or "
        "stopped renewing it",
        group,
        row.task_id,
        row.state,
        row.runner or "-",
    )
    if row.backend and rt.scheduler is not None:
        rt.scheduler.timed_out(group, row.task_id, row.backend)
    return 1


def register_tick(app: Celery) -> None:
    """Register the tick task on ``app`` and add it to the beat schedule once configured."""

    def tick(self: Any) -> dict[str, Any]:
        rt = runtime_for(self.app)
        return run_tick(rt) if rt is not None else {}

    tick.__name__ = "tick"
    tick.__doc__ = "Reclaim expired leases and dispatch waiting calls into free room."
    app.task(name=TICK_TASK, bind=True, ignore_result=True, shared=False)(tick)

    def schedule(sender: Celery | None = None, **_: Any) -> None:
        # Runs inside Celery's on_after_configure signal, which swallows exceptions: log them.
        try:
            rt = runtime_for(app)  # install() made it before it registered the tick
            assert rt is not None
            interval = rt.settings.tick_interval_s
            app.add_periodic_task(interval, app.signature(TICK_TASK), name=TICK_TASK)
        except Exception:
            logger.exception("celery_semaphore: could not add %s to the beat schedule", TICK_TASK)

    if app.configured:
        schedule()
    else:
        app.on_after_configure.connect(schedule, weak=False, dispatch_uid=f"{TICK_TASK}.{id(app)}")
