"""Final states the package records for calls that will never finish by themselves."""

from __future__ import annotations

import contextlib

from celery import Celery, states

from .errors import CallDropped, NeverStarted

__all__ = ["record_dropped", "record_failure", "record_never_started", "record_revoked"]


def record_failure(app: Celery, task_id: str, exc: BaseException) -> bool:
    """Store ``exc`` as the call's result unless a final state is stored already."""
    backend = app.backend
    try:
        if backend.get_state(task_id) in states.READY_STATES:
            return False
        backend.mark_as_failure(task_id, exc, call_errbacks=False)
    except NotImplementedError:  # no result backend: nowhere to record it
        return False
    return True


def record_dropped(app: Celery, group: str, task_id: str, runner: str) -> bool:
    """Record ``CallDropped`` for a call lost with its worker, if no result is stored."""
    return record_failure(app, task_id, CallDropped(group, task_id, runner))


def record_never_started(app: Celery, group: str, task_id: str, queue: str, attempts: int) -> bool:
    """Record ``NeverStarted`` for a call handed room again and again that never started."""
    return record_failure(app, task_id, NeverStarted(group, task_id, queue, attempts))


def record_revoked(app: Celery, task_id: str, reason: str) -> None:
    """Record REVOKED for a call that will never run."""
    with contextlib.suppress(NotImplementedError):
        app.backend.mark_as_revoked(task_id, reason=reason)
