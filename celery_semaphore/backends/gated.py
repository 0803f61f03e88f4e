"""``GatedCalls``: the parked calls of ``@gated`` tasks, as one backend of the slot model."""

from __future__ import annotations

from typing import Any

from celery.utils.log import get_logger

__all__ = ["GatedCalls"]

from .base import AbstractBackend

logger = get_logger(__name__)


class GatedCalls(AbstractBackend):
    """Serves a semaphore's parked calls in the order they were parked.

    Slots whose first backend it is (numbered ``1..limit``) are handed the next parked call
    inside the release script itself, in the same atomic step that frees them; a slot that
    lists it after other backends polls it like any backend.
    """

    def poll(self) -> str | None:
        """The id of the oldest parked call, or ``None``."""
        gate = self.context["gate"]
        head = gate.client.zrange(gate.keys[3], 0, 0)
        return head[0].decode() if head else None

    def start_callback(self, task_id: str) -> Any:
        """Publish the call's parked message (kept in Redis until the call starts)."""
        gate = self.context["gate"]
        message = gate.client.hget(gate.keys[4], task_id)
        if message is None:
            raise LookupError(f"parked call {task_id} of {gate.name!r} has no message")
        ext = self.context.get("extension")
        if ext is None:
            raise LookupError(
                "GatedCalls needs a Celery app: give the Scheduler context {'app': app}"
            )
        from ..gate import Grant

        ext.dispatch(gate.name, [Grant(task_id, 0, message)])
        return None

    def record_dropped(self, task_id: str, runner: str = "") -> bool:
        """Record ``CallDropped`` as the result of a call lost with its worker, if none is stored.

        Returns whether it was recorded.
        """
        from celery import states

        from ..errors import CallDropped

        ext = self.context.get("extension")
        if ext is None:
            return False
        backend = ext.app.backend
        try:
            if backend.get_state(task_id) in states.READY_STATES:
                return False
            backend.mark_as_failure(
                task_id,
                CallDropped(self.context["gate"].name, task_id, runner),
                call_errbacks=False,
            )
        except NotImplementedError:  # no result backend: nowhere to record it
            return False
        return True

    def timeout_callback(self, task_id: str) -> None:
        """A gated call's lease expired: its worker died or stopped renewing it."""
        logger.warning(
            "semaphore %r: call %s timed out (no keepalive); its slot was reclaimed",
            self.context["gate"].name,
            task_id,
        )
