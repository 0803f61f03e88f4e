"""Thin receivers of Celery's signals: find the gate and the call, call one Gate method.

Celery catches and logs whatever a receiver raises and runs the task anyway, so a receiver
cannot refuse a run. The verdict of ``task_prerun`` is stored on the request instead, and
the task's guarded ``run`` (see ``decorator.guard``) acts on it. Releases missed here (a
receiver that failed, a process that died) are repaired by lease expiry in the tick.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from celery import signals
from celery._state import get_current_task
from celery.exceptions import Ignore
from celery.utils.log import get_logger

from .gate import Started

__all__ = ["HEADER", "connect", "current_fence", "gate_of_request", "refuse_if_denied"]

logger = get_logger(__name__)

#: Message header naming the semaphore a call holds a slot of; the task id is the token.
HEADER = "semaphore_gate"
#: Message header of a copy sent back as the backup of a call that runs elsewhere.
BACKUP_HEADER = "semaphore_backup"

_RUNNER = f"{socket.gethostname()}:{os.getpid()}"


def _runner() -> str:
    # Recomputed after fork: a prefork child must not claim its parent's pid.
    global _RUNNER
    pid = os.getpid()
    if not _RUNNER.endswith(f":{pid}"):
        _RUNNER = f"{socket.gethostname()}:{pid}"
    return _RUNNER


def gate_of_request(request: Any) -> str | None:
    """Return the semaphore a request's message holds a slot of, or ``None`` if ungated."""
    name = getattr(request, HEADER, None)
    if name is None:
        headers = getattr(request, "headers", None) or {}
        name = headers.get(HEADER)
    return name if isinstance(name, str) else None


def current_fence() -> int | None:
    """Return the fencing number of the slot held by the task running now.

    Fences only grow per semaphore, so an external system that remembers the highest fence
    it saw can refuse writes from a holder whose lease was lost and re-granted. ``None``
    outside a gated run.
    """
    task = get_current_task()
    return getattr(task.request, "semaphore_fence", None) if task is not None else None


def refuse_if_denied() -> None:
    """Raise ``Ignore`` when ``task_prerun`` decided this run must not execute."""
    task = get_current_task()
    if task is None:
        return
    request = task.request
    verdict = getattr(request, "semaphore_verdict", None)
    if verdict is None or verdict.runs:
        return
    if verdict is Started.DUPLICATE and _allows_duplicates(task):
        logger.warning(
            "semaphore: call %s runs twice at once (semaphore_duplicates=allow)", request.id
        )
        return
    if verdict is Started.LOST:
        # The call lost its slot and none is free: send it through the gate again under the
        # same id, so the call is not lost, and skip this run.
        task.signature_from_request(request).apply_async()
        logger.warning("semaphore: call %s lost its slot; parked again", request.id)
    elif verdict is Started.DUPLICATE:
        # The running execution may be alive (a visibility-timeout copy) or dead (a killed
        # child whose message came back): keep this copy as a backup that runs only if the
        # first one's lease expires, so the call is neither run twice nor lost.
        headers = {**(request.headers or {}), BACKUP_HEADER: "1"}
        task.signature_from_request(request, headers=headers).apply_async()
        logger.warning(
            "semaphore: call %s already runs elsewhere; this copy waits as its backup", request.id
        )
    elif verdict is Started.ENDED:
        logger.warning("semaphore: call %s already ran to its end; late copy skipped", request.id)
    raise Ignore()


def _allows_duplicates(task: Any) -> bool:
    ext = _ext_for(task)
    return ext is not None and ext.settings.duplicates == "allow"


def holds_slot() -> bool:
    """Whether the gated task running now still holds its slot (one Redis round trip).

    A task that must not act after losing its lease (a long pause, a lost keepalive) can
    check before a side effect; :func:`current_fence` guards writes to systems that can
    compare fences. ``True`` outside a gated run.
    """
    task = get_current_task()
    if task is None:
        return True
    request = task.request
    name = gate_of_request(request)
    ext = _ext_for(task)
    if name is None or ext is None:
        return True
    return bool(ext.gate(name).holds(request.id, getattr(request, "semaphore_fence", None)))


def _ext_for(task: Any) -> Any:
    from .extension import extension_for

    return extension_for(getattr(task, "app", None))


def on_prerun(sender: Any = None, task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """``task_prerun``: renew the lease and mark the call running (a keepalive)."""
    request = task.request
    name = gate_of_request(request)
    ext = _ext_for(task)
    if name is None or ext is None:
        return
    # Whether anything brings the call back if this worker dies: an unacknowledged message
    # (acks_late), or Celery's own retry of a lost child.
    redeliver = bool(getattr(task, "acks_late", False) or getattr(task, "retry_on_worker_lost", 0))
    verdict, fence, backend_name = ext.gate(name).start(task_id, _runner(), redeliver=redeliver)
    request.semaphore_verdict = verdict
    request.semaphore_fence = fence if verdict.runs else None
    if verdict.runs and backend_name:
        ext.scheduler.notify_keepalive(name, {task_id: backend_name})


def on_postrun(
    sender: Any = None,
    task_id: str | None = None,
    task: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    """``task_postrun`` in any state: release the slot and hand it to the next call."""
    request = task.request
    name = gate_of_request(request)
    ext = _ext_for(task)
    if name is None or ext is None or state == "RETRY":
        # A retry was already sent with the same id and headers: it keeps the slot.
        return
    verdict = getattr(request, "semaphore_verdict", None)
    if verdict is not None and not verdict.runs:
        return  # this run held no slot of its own; releasing would free another's
    ext.release(name, task_id, getattr(request, "semaphore_fence", None))


def on_failure(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    """``task_failure`` raised outside the run (hard time limit, lost child): release by id.

    Celery pushes a request context in the main process before it reports a lost child, so
    "outside the run" is told by the absence of our prerun's mark, not by the request id.
    """
    if sender is None or task_id is None:
        return
    request = sender.request
    if getattr(request, "id", None) == task_id and hasattr(request, "semaphore_verdict"):
        return  # inside the run (our prerun marked it): task_postrun follows with the fence
    ext = _ext_for(sender)
    if ext is None:
        return
    # The header names the gate, also for a task a scheduler slot started (not @gated);
    # Celery's second report of a hard time limit has an empty request: then the task's spec.
    name = gate_of_request(request) or ext.gate_name_of_task(sender.name)
    if name is not None:
        ext.release(name, task_id, None)


def on_revoked(sender: Any = None, request: Any = None, terminated: bool = False, **_: Any) -> None:
    """``task_revoked``: a call revoked before it ran (or expired) gives its slot back.

    A terminated run is left to ``task_postrun(state=None)`` from the dying child (or to
    lease expiry): releasing here, in the main process, could hand the slot over while the
    child is still running.
    """
    if terminated:
        return
    ext = _ext_for(sender)
    name = gate_of_request(request)
    if ext is not None and name is not None and getattr(request, "id", None):
        ext.release(name, request.id, None)


def on_unknown(sender: Any = None, id: str | None = None, message: Any = None, **_: Any) -> None:
    """``task_unknown``: a gated message no worker can run gives its slot back."""
    from .extension import installed_extensions

    headers = getattr(message, "headers", None) or {}
    name = headers.get(HEADER)
    if not isinstance(name, str) or id is None:
        return
    app = getattr(sender, "app", None)
    for ext in installed_extensions():
        if app is None or ext.app is app:
            ext.release(name, id, None)
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
