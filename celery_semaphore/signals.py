"""Thin receivers of Celery's signals, and the guard that acts on their verdict.

Celery catches and logs whatever a receiver raises and runs the task anyway, so a receiver
cannot refuse a run. The verdict of ``task_prerun`` is stored on the request instead, and
the guarded ``run`` of the task (see :func:`guard`; every task of a worker is guarded, so a
task started by a scheduler slot is too) acts on it. Releases missed here (a receiver that
failed, a process that died) are repaired by lease expiry in the tick.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from typing import Any

import redis
from celery import signals
from celery._state import get_current_task
from celery.exceptions import Ignore
from celery.utils.log import get_logger

from .errors import LeaseLost, RedisUnavailable
from .group import Started
from .publish import BACKUP_HEADER, HEADER
from .runtime import HANDOFF_HEADER, runtime_for, runtimes

__all__ = [
    "GUARD_ATTR",
    "connect",
    "current_fence",
    "group_of_request",
    "guard",
    "holds_slot",
    "require_slot",
]

logger = get_logger(__name__)

#: Marks a run function that is already guarded.
GUARD_ATTR = "__semaphore_guard__"

_RUNNER = f"{socket.gethostname()}:{os.getpid()}"


def _runner() -> str:
    # Recomputed after fork: a prefork child must not claim its parent's pid.
    global _RUNNER
    pid = os.getpid()
    if not _RUNNER.endswith(f":{pid}"):
        _RUNNER = f"{socket.gethostname()}:{pid}"
    return _RUNNER


def _header(request: Any, name: str) -> Any:
    value = getattr(request, name, None)
    if value is None:
        headers = getattr(request, "headers", None) or {}
        value = headers.get(name)
    return value


def group_of_request(request: Any) -> str | None:
    """The gate group a request's message holds, or ``None`` if it is not gated."""
    name = _header(request, HEADER)
    return name if isinstance(name, str) else None


def current_fence() -> int | None:
    """The fencing number of the grant held by the task running now.

    Fences only grow per gate, so an external system that remembers the highest fence it saw
    can refuse writes from a holder whose lease was lost and granted again. ``None`` outside
    a gated run.
    """
    task = get_current_task()
    return getattr(task.request, "semaphore_fence", None) if task is not None else None


def holds_slot() -> bool:
    """Whether the gated task running now still holds its gates (one Redis round trip).

    ``True`` outside a gated run.
    """
    task = get_current_task()
    if task is None:
        return True
    request = task.request
    name = group_of_request(request)
    rt = runtime_for(getattr(task, "app", None))
    if name is None or rt is None:
        return True
    return rt.group(name).holds(request.id, getattr(request, "semaphore_fence", None))


def require_slot() -> None:
    """Raise :class:`~celery_semaphore.LeaseLost` when the running task lost its gates."""
    if not holds_slot():
        task = get_current_task()
        request = task.request if task is not None else None
        raise LeaseLost(group_of_request(request) or "", getattr(request, "id", ""))


def guard(run: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a task's run so that a run the gate refused (see ``on_prerun``) does not execute."""
    if getattr(run, GUARD_ATTR, False):
        return run

    @functools.wraps(run)
    def guarded_run(*args: Any, **kwargs: Any) -> Any:
        refuse_if_denied()
        return run(*args, **kwargs)

    setattr(guarded_run, GUARD_ATTR, True)
    return guarded_run


def refuse_if_denied() -> None:
    """Raise ``Ignore`` when ``task_prerun`` decided this run must not execute."""
    task = get_current_task()
    if task is None:
        return
    request = task.request
    unrecorded = getattr(request, "semaphore_unrecorded", False)
    if unrecorded:
        # A start that timed out ("unknown") may still run when a stalled server resumes: it
        # then marks the call running and drops its message, so nothing would send it again.
        if unrecorded == "refused" and _header(request, HANDOFF_HEADER) == "1":
            # Its message is still in Redis: the tick sends it again once its lease expires,
            # and that run is recorded. Running this one too would run the call twice.
            logger.warning(
                "gate: the start of call %s could not be recorded (Redis unreachable); skipped, "
                "it is sent again from Redis",
                request.id,
            )
            raise Ignore()
        # Granted at submit, or its start may be recorded late: nothing else will send it, so
        # run it; the keepalive renews its hold once Redis answers (so the tick does not send
        # it again), and its end releases it as usual.
        logger.warning(
            "gate: the start of call %s could not be recorded (Redis unreachable); running it",
            request.id,
        )
        return
    verdict = getattr(request, "semaphore_verdict", None)
    if verdict is None or verdict.runs:
        return
    if verdict is Started.DUPLICATE and _allows_duplicates(task):
        logger.warning("gate: call %s runs twice at once (semaphore_duplicates=allow)", request.id)
        return
    if verdict in (Started.LOST, Started.DUPLICATE) and not _is_gated(task):
        # Started by a scheduler slot: a copy sent again would bypass any gate and come
        # straight back with the same verdict, in a loop. The slot's lease covers a first run
        # that died (its backend's timeout_callback), so this copy is only skipped.
        logger.warning(
            "gate: call %s (started by a scheduler slot) %s; this copy skipped",
            request.id,
            "runs elsewhere" if verdict is Started.DUPLICATE else "holds no slot any more",
        )
    elif verdict is Started.LOST:
        # The call holds nothing: send it through the gate again under the same id, so it is
        # not lost, and skip this run.
        task.signature_from_request(request).apply_async()
        logger.warning("gate: call %s held nothing; sent through its gate again", request.id)
    elif verdict is Started.DUPLICATE:
        # The running execution may be alive (a visibility-timeout copy) or dead (a killed
        # child whose message came back): keep this copy as a backup that runs only if the
        # first one's lease expires, so the call is neither run twice nor lost.
        headers = {**(request.headers or {}), BACKUP_HEADER: "1"}
        task.signature_from_request(request, headers=headers).apply_async()
        logger.warning(
            "gate: call %s already runs elsewhere; this copy waits as its backup", request.id
        )
    elif verdict is Started.ENDED:
        logger.warning(
            "gate: call %s already ended or was cancelled; late copy skipped", request.id
        )
    raise Ignore()


def _is_gated(task: Any) -> bool:
    rt = runtime_for(getattr(task, "app", None))
    return rt is not None and rt.gates_of(task.name) is not None


def _allows_duplicates(task: Any) -> bool:
    rt = runtime_for(getattr(task, "app", None))
    return rt is not None and rt.settings.duplicates == "allow"


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
        verdict, fence, backend = rt.group(name).start(task_id, _runner(), redeliver=redeliver)
    except RedisUnavailable as exc:
        # Refused, or a connect timeout: nothing was sent. A read timeout: the start may still
        # run later in Redis (see Group._run).
        cause = exc.cause
        timed_out = isinstance(cause, redis.TimeoutError) and "connecting" not in str(cause)
        request.semaphore_unrecorded = "unknown" if timed_out else "refused"
        raise
    request.semaphore_verdict = verdict
    request.semaphore_fence = fence if verdict.runs else None
    if verdict.runs and backend and rt.scheduler is not None:
        rt.scheduler.notify_keepalive(name, {task_id: backend})


def on_postrun(
    sender: Any = None,
    task_id: str | None = None,
    task: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    """``task_postrun`` in any state: give the hold back and hand room to the next calls."""
    request = task.request
    name = group_of_request(request)
    rt = runtime_for(getattr(task, "app", None))
    if name is None or rt is None or task_id is None:
        return
    if state == "RETRY" or getattr(request, "semaphore_resent", None) == name:
        # A retry or a replacement was sent under the same id by this run: it keeps the hold.
        return
    verdict = getattr(request, "semaphore_verdict", None)
    if verdict is not None and not verdict.runs:
        return  # this run held nothing of its own; releasing would free another's
    unrecorded = getattr(request, "semaphore_unrecorded", False)
    if unrecorded == "refused" and _header(request, HANDOFF_HEADER) == "1":
        return  # skipped: its hold is the one Redis will send again
    rt.release(name, task_id, getattr(request, "semaphore_fence", None))


def on_failure(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
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
        rt.release(name, task_id, None)


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
        rt.release(name, request.id, None)


def on_unknown(sender: Any = None, id: str | None = None, message: Any = None, **_: Any) -> None:
    """``task_unknown``: a gated message no worker can run gives its hold back."""
    headers = getattr(message, "headers", None) or {}
    name = headers.get(HEADER)
    if not isinstance(name, str) or id is None:
        return
    app = getattr(sender, "app", None)
    for rt in runtimes():
        if app is None or rt.app is app:
            rt.release(name, id, None)
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
