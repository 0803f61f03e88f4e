"""Final states the package records for calls that will never finish by themselves."""

from __future__ import annotations

import contextlib
from typing import Any

from celery import Celery, states
from celery.app.task import Context
from celery.utils.log import get_logger
from kombu.serialization import loads

from .errors import CallDropped, NeverStarted
from .message import Envelope
from .runtime import Runtime

__all__ = [
    "cancel_call",
    "fail_call",
    "record_dropped",
    "record_failure",
    "record_never_started",
    "record_revoked",
    "report_waiting",
    "PARKED",
    "WAITING",
    "request_of",
]

logger = get_logger(__name__)


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


#: Result states of a call that waits in its gate (Celery's own states replace them once it runs).
PARKED, WAITING = "PARKED", "WAITING"


def report_waiting(app: Celery, task_id: str, state: str) -> bool:
    """Show ``state`` (PARKED or WAITING) as the call's result state while it waits.

    Written only where no state is stored yet (``SET NX``), so a call that was handed room and
    ran meanwhile keeps its own state. Only a Redis result backend offers that; with another
    one (or none) nothing is written. Returns whether it was written.
    """
    backend = app.backend
    client = getattr(backend, "client", None)
    key_for = getattr(backend, "get_key_for_task", None)
    try:
        meta = backend._get_result_meta(result=None, state=state, traceback=None, request=None)
        meta["task_id"] = task_id
        if client is not None and key_for is not None:
            expires = backend.expires
            seconds = int(expires.total_seconds()) if hasattr(expires, "total_seconds") else expires
            return bool(
                client.set(key_for(task_id), backend.encode(meta), nx=True, ex=seconds or None)
            )
        return False
    except NotImplementedError:  # no result backend
        return False
    except Exception:  # a report is a courtesy: the call itself is accepted already
        logger.warning("celery_semaphore: could not report %s for call %s", state, task_id)
        return False


def record_revoked(app: Celery, task_id: str, reason: str) -> None:
    """Record REVOKED for a call that will never run."""
    with contextlib.suppress(NotImplementedError):
        app.backend.mark_as_revoked(task_id, reason=reason)


def request_of(task_id: str, message: bytes | Envelope) -> Context | None:
    """Rebuild the request of a call that never ran from its stored message (for errbacks)."""
    try:
        envelope = message if isinstance(message, Envelope) else Envelope.decode(message)
        body = loads(envelope.data, envelope.content_type, envelope.content_encoding, accept=None)
        args, kwargs, embed = body
        headers: dict[str, Any] = envelope.publish_kwargs.get("headers") or {}
    except Exception:  # an unreadable message: the failure is still recorded, without errbacks
        logger.exception("celery_semaphore: cannot read the message of call %s", task_id)
        return None
    return Context(
        id=task_id,
        task=headers.get("task"),
        args=args,
        kwargs=kwargs,
        errbacks=embed.get("errbacks"),
        callbacks=embed.get("callbacks"),
        chord=embed.get("chord"),
        root_id=headers.get("root_id"),
        parent_id=headers.get("parent_id"),
        group=headers.get("group"),
        delivery_info={},
    )


def fail_call(app: Celery, task_id: str, exc: BaseException, message: bytes | Envelope) -> None:
    """End a call that never ran with ``exc``: store FAILURE and run its ``link_error``."""
    request = request_of(task_id, message)
    try:
        app.backend.mark_as_failure(
            task_id, exc, request=request, call_errbacks=request is not None
        )
    except NotImplementedError:  # no result backend: the errbacks still run
        if request is not None and request.errbacks:
            app.backend._call_task_errbacks(request, exc, None)


def cancel_call(rt: Runtime, task_id: str) -> str:
    """Cancel a call before its run in whichever group holds it; see ``celery_semaphore.cancel``."""
    for name in rt.known_groups():
        state, grants = rt.group(name).cancel(task_id)
        rt.dispatch(name, grants)
        if state == "running":
            return state
        if state:
            record_revoked(rt.app, task_id, f"cancelled while {state}")
            return state
    return ""
