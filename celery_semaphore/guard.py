"""The guard every task of a worker runs through, and what a gated task asks of its hold.

Celery catches and logs whatever a signal receiver raises and runs the task anyway, so a
receiver cannot refuse a run. The verdict of ``task_prerun`` (see :mod:`.signals`) is stored on
the request instead, and the guarded ``run`` of the task acts on it. Every task of a worker is
guarded (``worker.guard_all_tasks``), so a task a scheduler slot started is too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from celery._state import get_current_task
from celery.exceptions import Ignore
from celery.utils.log import get_logger

from .errors import LeaseLost
from .group import Started
from .inputs import INPUTS_HEADER, decode_inputs
from .publish import BACKUP_HEADER, HEADER
from .runtime import HANDOFF_HEADER, runtime_for

__all__ = [
    "GUARD_ATTR",
    "current_fence",
    "group_of_request",
    "guard",
    "header_of",
    "holds_slot",
    "refuse_if_denied",
    "require_slot",
]

logger = get_logger(__name__)

#: Marks a run function that is already guarded.
GUARD_ATTR = "__semaphore_guard__"


def header_of(request: Any, name: str) -> Any:
    """A message header of a request (protocol 2 puts it on the request and in its headers)."""
    value = getattr(request, name, None)
    if value is None:
        headers = getattr(request, "headers", None) or {}
        value = headers.get(name)
    return value


def group_of_request(request: Any) -> str | None:
    """The gate group a request's message holds, or ``None`` if it is not gated."""
    name = header_of(request, HEADER)
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
        inputs = _inputs()
        if inputs is not None:
            # A workflow node: its requirements' results come first, as in a chain.
            args = (inputs[0] if len(inputs) == 1 else inputs, *args)
        return run(*args, **kwargs)

    setattr(guarded_run, GUARD_ATTR, True)
    return guarded_run


def _inputs() -> list[Any] | None:
    """The results a dependent receives from its requirements (its inputs header), or None."""
    task = get_current_task()
    if task is None:
        return None
    raw = header_of(task.request, INPUTS_HEADER)
    if not isinstance(raw, str) or not raw:
        return None
    return decode_inputs(task.app, raw)


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
        if unrecorded == "refused" and header_of(request, HANDOFF_HEADER) == "1":
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
    if verdict is None and group_of_request(request) is None:
        if not getattr(request, "is_eager", False) and _is_gated(task):
            # A call of a gated task sent without its gate: by a process where the task is
            # not registered (send_task by name) or whose app never installed the extension.
            # It runs only through its gate.
            task.signature_from_request(request).apply_async()
            logger.warning(
                "gate: call %s of gated task %s arrived without its gate; sent through it",
                request.id,
                task.name,
            )
            raise Ignore()
        return
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
