"""Inside a worker: every task's run guarded, and a bootstep that keeps leases alive.

The keepalive runs on the worker's timer in the main process, so it covers the prefork,
threads, eventlet and gevent pools; it cannot run during a task on the ``solo`` pool, whose
only thread is busy running the task.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from typing import Any

from celery import bootsteps, signals
from celery.utils.log import get_logger
from celery.worker import state

from .guard import guard
from .publish import GATES_HEADER, HEADER
from .runtime import runtime_for, runtimes

__all__ = ["Keepalive", "gated_requests", "guard_all_tasks", "process_alive"]

logger = get_logger(__name__)


def gated_requests() -> dict[str, dict[str, list[str]]]:
    """``{group: {call id: gates}}`` of the gated requests this worker runs or has prefetched."""
    calls: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for request in list(state.active_requests) + list(state.reserved_requests):
        message = getattr(request, "_request_dict", {})
        group = message.get(HEADER)
        # Celery may notice a killed prefork child seconds late; its run is over, so its
        # lease must not be renewed meanwhile.
        if isinstance(group, str) and process_alive(getattr(request, "worker_pid", None)):
            gates = str(message.get(GATES_HEADER) or group).split(",")
            calls[group][request.id] = gates
    return calls


def process_alive(pid: int | None) -> bool:
    """Whether the process running a request is alive (not gone, not a zombie)."""
    if not pid or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The state follows the parenthesised command name; Z is a zombie.
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def guard_all_tasks(sender: Any = None, **_: Any) -> None:
    """``worker_init``: guard the run of every task of the worker's app.

    Any message carrying the gate header must obey its verdict (a task a scheduler slot
    started is not ``@gated``). Done before the pool starts, so prefork children inherit it
    and Celery's tracers (built at a task's first run) use the guarded run.
    """
    app = getattr(sender, "app", None)
    if app is None or runtime_for(app) is None:
        return
    for task in list(app.tasks.values()):
        run = task.__dict__.get("run") or getattr(task, "run", None)
        if run is not None:
            task.run = guard(run)


def let_go_of_held_calls(sender: Any = None, **_: Any) -> None:
    """``worker_shutting_down``: tell the pool to let go of calls it holds ahead of their grant.

    A prefork child holding a call (``semaphore_prefetch``) does not see the shutdown: a token
    ``"0"`` on each wake list of the worker's gated requests ends the hold, so a warm shutdown
    waits for the calls that run, not for the turn of those that wait. Sent from a thread: the
    signal arrives in a signal handler, where the connection pool's lock may be taken.
    """
    requests = gated_requests()
    if not requests:
        return

    def push() -> None:
        for rt in runtimes():
            if not (rt.settings.prefetch and rt.broker_push):
                continue
            try:
                pipe = rt.client.pipeline(transaction=False)
                for group, calls in requests.items():
                    for task_id in calls:
                        key = rt.group(group).wake_key(task_id)
                        pipe.lpush(key, "0")
                        pipe.pexpire(key, WAKE_TOKEN_TTL_MS)
                pipe.execute()
            except Exception:  # the holds end at their next look, or with the process
                logger.exception("celery_semaphore: could not tell held calls to let go")

    threading.Thread(target=push, name="celery_semaphore let go", daemon=True).start()


#: How long a "let go" token waits for a holder to read it.
WAKE_TOKEN_TTL_MS = 30_000


def connect_worker_init() -> None:
    """Connect :func:`guard_all_tasks` and :func:`let_go_of_held_calls` once per process."""
    signals.worker_init.connect(
        guard_all_tasks, weak=False, dispatch_uid="celery_semaphore.guard_all_tasks"
    )
    signals.worker_shutting_down.connect(
        let_go_of_held_calls, weak=False, dispatch_uid="celery_semaphore.let_go_of_held_calls"
    )


class Keepalive(bootsteps.StartStopStep):
    """Renews leases every third of the shortest lease."""

    requires = {"celery.worker.components:Timer"}
    label = "celery_semaphore keepalive"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref: Any = None

    def start(self, worker: Any) -> None:
        """Start the timer (a no-op for an app without the extension)."""
        rt = runtime_for(worker.app)
        if rt is None:
            return
        lease_ms = int(rt.settings.lease_s * 1000)

        def renew(requests: dict[str, Any]) -> None:
            for group, calls in requests.items():
                try:
                    lost, backends = rt.group(group).keepalive(calls, lease_ms)
                except Exception:  # the timer must go on; lease expiry covers a missed renewal
                    logger.exception("celery_semaphore: keepalive of group %r failed", group)
                    continue
                if backends and rt.scheduler is not None:
                    rt.scheduler.notify_keepalive(group, backends)
                for task_id in lost:
                    logger.warning("gate: call %s holds nothing any more (lease lost)", task_id)

        busy = threading.Lock()

        def renew_in_background() -> None:
            # On the worker's event loop: only take the snapshot here. The round trips run on
            # a thread of their own, so an unreachable Redis (up to semaphore_redis_timeout per
            # call) never stalls the loop that consumes messages and answers pings; a renewal
            # still running makes this one skip.
            if not busy.acquire(blocking=False):
                return
            requests = gated_requests()

            def run() -> None:
                try:
                    renew(requests)
                finally:
                    busy.release()

            threading.Thread(target=run, name="celery_semaphore keepalive", daemon=True).start()

        self.tref = worker.timer.call_repeatedly(
            keepalive_interval(rt), renew_in_background, priority=10
        )

    def stop(self, worker: Any) -> None:
        """Stop the timer."""
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None


def keepalive_interval(rt: Any) -> float:
    """Seconds between two keepalives: a third of the shortest lease of any gated task or slot."""
    leases = [rt.settings.lease_s] + [g.lease_s for g in rt.task_gates()]
    scheduler = rt.scheduler
    if scheduler is not None:
        leases += [slot.timeout_s for slot in scheduler.slots]
    return max(min(leases) / 3.0, 0.05)
