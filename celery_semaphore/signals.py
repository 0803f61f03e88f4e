"""Thin receivers of Celery's signals: find the group and the call, call one Group method.

The verdict of ``task_prerun`` is left on the request for the guard (:mod:`.guard`) to act
on. Releases missed here (a receiver that failed, a process that died) are repaired by lease
expiry in the tick.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import redis
from celery import signals
from celery.utils.log import get_logger

from .errors import RedisUnavailable
from .group import Started
from .guard import group_of_request, header_of
from .hold import confirmed, hold
from .inputs import encode_error, encode_result, error_text
from .publish import HEADER
from .runtime import HANDOFF_HEADER, WORKFLOW_HEADER, runtime_for, runtimes

__all__ = ["HEADER", "connect", "on_failure", "on_postrun", "on_prerun", "on_revoked", "on_unknown"]

logger = get_logger(__name__)

_RUNNER = f"{socket.gethostname()}:{os.getpid()}"


def _runner() -> str:
    # Recomputed after fork: a prefork child must not claim its parent's pid.
    global _RUNNER
    pid = os.getpid()
    if not _RUNNER.endswith(f":{pid}"):
        _RUNNER = f"{socket.gethostname()}:{pid}"
    return _RUNNER


def on_prerun(sender: Any = None, task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """``task_prerun``: record the start (a keepalive too) and leave the verdict on the request."""
    request = task.request
    name = group_of_request(request)
    rt = runtime_for(getattr(task, "app", None))
    if name is None or rt is None or task_id is None:
        return
    # Whether anything brings the call back if this worker dies: an unacknowledged message
    # (acks_late), or Celery's own retry of a lost child.
    redeliver = bool(getattr(task, "acks_late", False) or getattr(task, "retry_on_worker_lost", 0))
    try:
        group = rt.group(name)
        verdict, fence, backend, wanted, follow = group.start(
            task_id, _runner(), redeliver=redeliver
        )
        if verdict is Started.AHEAD:
            verdict, fence, backend, wanted, follow = hold(rt, group, request, _runner(), redeliver)
    except RedisUnavailable as exc:
        # Refused, or a connect timeout: nothing was sent. A read timeout: the start may still
        # run later in Redis (see Group._run).
        cause = exc.cause
        timed_out = isinstance(cause, redis.TimeoutError) and "connecting" not in str(cause)
        if getattr(request, "semaphore_unrecorded", None) != "refused":  # set by hold()
            request.semaphore_unrecorded = "unknown" if timed_out else "refused"
        raise
    request.semaphore_verdict = verdict
    request.semaphore_fence = fence if verdict.runs else None
    request.semaphore_wanted = wanted
    if follow:
        rt.dispatch(name, follow)
    if verdict.runs and backend and rt.scheduler is not None:
        rt.scheduler.notify_keepalive(name, {task_id: backend})


def on_postrun(
    sender: Any = None,
    task_id: str | None = None,
    task: Any = None,
    state: str | None = None,
    retval: Any = None,
    **_: Any,
) -> None:
    """``task_postrun`` in any state: give the hold back and hand room to the next calls."""
    request = task.request
    name = group_of_request(request)
    rt = runtime_for(getattr(task, "app", None))
    if name is None or rt is None or task_id is None:
        return
    confirmed(request)
    if state == "RETRY" or getattr(request, "semaphore_resent", None) == name:
        # A retry or a replacement was sent under the same id by this run: it keeps the hold.
        return
    verdict = getattr(request, "semaphore_verdict", None)
    if verdict is not None and not verdict.runs:
        return  # this run held nothing of its own; releasing would free another's
    unrecorded = getattr(request, "semaphore_unrecorded", False)
    if unrecorded == "refused" and header_of(request, HANDOFF_HEADER) == "1":
        return  # skipped: its hold is the one Redis will send again
    final, payload, text = _ending(task.app, state, retval, getattr(request, "semaphore_wanted", 0))
    rt.release(
        name,
        task_id,
        getattr(request, "semaphore_fence", None),
        state=final,
        payload=payload,
        text=text,
    )
    workflow = header_of(request, WORKFLOW_HEADER)
    if final == "FAILED" and workflow and rt.on_node_failed is not None:
        rt.on_node_failed(task_id, str(workflow))


def _ending(app: Any, state: str | None, retval: Any, wanted: Any) -> tuple[str, str, str]:
    """How a run ended, for the call's history and its dependents: (state, payload, text).

    The result is encoded only when calls wait for it (``wanted``, from the start script).
    """
    if state == "SUCCESS":
        payload = ""
        if wanted:
            try:
                payload = encode_result(app, retval)
            except Exception:  # unserializable: dependents read it from the result backend
                logger.warning("celery_semaphore: a result its dependents need is not serializable")
        return "SUCCEEDED", payload, ""
    if state == "FAILURE" and isinstance(retval, BaseException):
        payload = encode_error(app, retval) if wanted else ""
        return "FAILED", payload, error_text(retval)
    return "CANCELLED", "", (state or "terminated").lower()


def on_failure(sender: Any = None, task_id: str | None = None, **kwargs: Any) -> None:
    """``task_failure`` raised outside the run (hard time limit, lost child): release by id.

    Celery pushes a request context in the main process before it reports a lost child, so
    "outside the run" is told by the absence of our prerun's mark, not by the request id.
    """
    if sender is None or task_id is None:
        return
    request = sender.request
    if getattr(request, "id", None) == task_id and (
        hasattr(request, "semaphore_verdict") or hasattr(request, "semaphore_unrecorded")
    ):
        return  # inside the run (our prerun marked it): task_postrun follows with the fence
    rt = runtime_for(getattr(sender, "app", None))
    if rt is None:
        return
    # The header names the group, also for a task a scheduler slot started (not @gated);
    # Celery's second report of a hard time limit has an empty request: then the task's gates.
    name = group_of_request(request)
    if name is None:
        gates = rt.gates_of(sender.name)
        name = gates.group if gates is not None else None
    if name is not None:
        exc = kwargs.get("exception")
        text = error_text(exc) if isinstance(exc, BaseException) else "failed"
        rt.release(name, task_id, None, state="FAILED", text=text)
        workflow = header_of(request, WORKFLOW_HEADER)
        if workflow and rt.on_node_failed is not None:
            rt.on_node_failed(task_id, str(workflow))


def on_revoked(sender: Any = None, request: Any = None, terminated: bool = False, **_: Any) -> None:
    """``task_revoked``: a call revoked before it ran (or expired) gives its hold back.

    A terminated run is left to ``task_postrun(state=None)`` from the dying child (or to
    lease expiry): releasing here, in the main process, could hand the room over while the
    child still runs.
    """
    if terminated:
        return
    rt = runtime_for(getattr(sender, "app", None))
    name = group_of_request(request)
    if rt is not None and name is not None and getattr(request, "id", None):
        rt.release(name, request.id, None, state="CANCELLED", text="revoked")


def on_unknown(sender: Any = None, id: str | None = None, message: Any = None, **_: Any) -> None:
    """``task_unknown``: a gated message no worker can run gives its hold back."""
    headers = getattr(message, "headers", None) or {}
    name = headers.get(HEADER)
    if not isinstance(name, str) or id is None:
        return
    app = getattr(sender, "app", None)
    for rt in runtimes():
        if app is None or rt.app is app:
            rt.release(name, id, None, state="DROPPED", text="no worker knows the task")
            return


_RECEIVERS = (
    (signals.task_prerun, on_prerun),
    (signals.task_postrun, on_postrun),
    (signals.task_failure, on_failure),
    (signals.task_revoked, on_revoked),
    (signals.task_unknown, on_unknown),
)


def connect() -> None:
    """Connect every receiver once per process (idempotent through ``dispatch_uid``)."""
    for signal, receiver in _RECEIVERS:
        signal.connect(receiver, weak=False, dispatch_uid=f"celery_semaphore.{receiver.__name__}")
