"""A worker bootstep that keeps the leases of running (and prefetched) gated calls alive.

It runs on the worker's timer in the main process, so it covers the prefork, threads,
eventlet and gevent pools; it cannot run during a task on the ``solo`` pool, whose only
thread is busy running the task.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

from celery import bootsteps
from celery.utils.log import get_logger
from celery.worker import state

from .signals import HEADER

__all__ = ["Keepalive", "gated_requests", "process_alive"]

logger = get_logger(__name__)


def gated_requests() -> dict[str, list[str]]:
    """``{gate: [call ids]}`` of the gated requests this worker runs or has prefetched."""
    calls: dict[str, list[str]] = defaultdict(list)
    for request in list(state.active_requests) + list(state.reserved_requests):
        gate = getattr(request, "_request_dict", {}).get(HEADER)
        # Celery may notice a killed prefork child seconds late; its run is over, so its
        # lease must not be renewed meanwhile.
        if isinstance(gate, str) and process_alive(getattr(request, "worker_pid", None)):
            calls[gate].append(request.id)
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


class Keepalive(bootsteps.StartStopStep):
    """Renews leases every third of the shortest lease."""

    requires = {"celery.worker.components:Timer"}
    label = "celery_semaphore keepalive"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref: Any = None

    def start(self, worker: Any) -> None:
        """Start the timer (a no-op for an app without the extension)."""
        from .extension import extension_for

        ext = extension_for(worker.app)
        if ext is None:
            return

        def renew() -> None:
            calls = gated_requests()
            if not calls:
                return
            try:
                lost = ext.keepalive(calls)
            except Exception:  # the timer must go on; lease expiry covers a missed renewal
                logger.exception("celery_semaphore: keepalive failed")
                return
            for task_id in lost:
                logger.warning("semaphore: call %s holds no slot any more (lease lost)", task_id)

        self.tref = worker.timer.call_repeatedly(ext.keepalive_interval(), renew, priority=10)

    def stop(self, worker: Any) -> None:
        """Stop the timer."""
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
