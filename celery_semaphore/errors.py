"""The exceptions celery_semaphore raises: one root, a subclass per condition."""

from __future__ import annotations

__all__ = [
    "AcceptanceUnknown",
    "AcquireTimeout",
    "GateFull",
    "WaitTimeout",
    "CallDropped",
    "ConfigurationError",
    "DuplicateCall",
    "LeaseLost",
    "NeverStarted",
    "RedisUnavailable",
    "RequirementFailed",
    "ScriptError",
    "WorkflowError",
    "SemaphoreError",
]


class SemaphoreError(Exception):
    """Root of every error raised by celery_semaphore."""


class ConfigurationError(SemaphoreError, ValueError):
    """A setting or decorator option is missing or has a wrong value.

    It is also a ``ValueError``, so code that validates input generically catches it.
    """


class RedisUnavailable(SemaphoreError):
    """The Redis server that holds the gates could not be reached; nothing was written.

    Deliberately not an ``OSError``: kombu would re-raise those as its own OperationalError
    and hide the URL from the caller.

    Attributes:
        url: the Redis URL (password masked) that was tried.
    """

    def __init__(self, url: str, cause: BaseException | None = None) -> None:
        self.url = url
        self.cause = cause
        detail = f": {cause}" if cause is not None else ""
        super().__init__(
            f"cannot reach the semaphore Redis at {url}{detail}. Check that the server runs "
            "and that the setting semaphore_redis_url names it; nothing was written for this call."
        )


class AcceptanceUnknown(RedisUnavailable):
    """The request reached Redis but no answer came back in time: the call may be accepted.

    Raised when the connection was up but the reply timed out (a stalled server): the script
    may still run when the server resumes. Sending the same task id again is safe: it either
    is accepted now or raises :class:`DuplicateCall`, so the call never runs twice.

    Attributes:
        url: the Redis URL (password masked).
        task_id: the call whose fate is unknown.
    """

    def __init__(self, url: str, task_id: str, cause: BaseException | None = None) -> None:
        SemaphoreError.__init__(
            self,
            f"no answer from the semaphore Redis at {url} in time ({cause}); call {task_id} "
            "may have been accepted. Send it again with the same task_id: a second send never "
            "runs it twice (it raises DuplicateCall if the first one was accepted).",
        )
        self.url = url
        self.cause = cause
        self.task_id = task_id


class DuplicateCall(SemaphoreError):
    """A call was sent under a task id that its gate already holds (waiting, parked or held).

    The first send stands and runs once; this one wrote nothing. Celery's own retries and
    ``Task.replace`` are not duplicates: they are sent by the call's own run.

    Attributes:
        gate: the gate's name.
        task_id: the id sent twice.
    """

    def __init__(self, gate: str, task_id: str) -> None:
        super().__init__(
            f"call {task_id} of gate {gate!r} was already sent and is still pending or running; "
            "this second send was not kept (send it under a new task id to run it again)"
        )
        self.gate = gate
        self.task_id = task_id


class LeaseLost(SemaphoreError):
    """A running call no longer holds its gate (its lease expired and was reclaimed).

    Raised by :func:`celery_semaphore.require_slot`.

    Attributes:
        gate: the gate's name.
        task_id: the call whose lease was lost.
    """

    def __init__(self, gate: str, task_id: str) -> None:
        super().__init__(gate, task_id)
        self.gate = gate
        self.task_id = task_id

    def __str__(self) -> str:
        return f"call {self.task_id} lost its hold of gate {self.gate!r}"


class CallDropped(SemaphoreError):
    """Recorded as the result of a call whose worker died while it held its gate.

    With early acknowledgement (Celery's default) the broker forgets a message once a worker
    takes it; if that worker dies, the tick reclaims the gate and records this as the call's
    final state, so a caller waiting on the result learns it.

    Attributes:
        gate: the gate's name.
        task_id: the call.
        runner: the host and pid that last ran it.
    """

    def __init__(self, gate: str, task_id: str, runner: str = "") -> None:
        # args are the constructor's, so Celery can rebuild it from a stored result.
        super().__init__(gate, task_id, runner)
        self.gate = gate
        self.task_id = task_id
        self.runner = runner

    def __str__(self) -> str:
        return (
            f"call {self.task_id} of gate {self.gate!r} was dropped: its worker "
            f"({self.runner or 'unknown'}) died while it held the gate and the broker will not "
            "redeliver it (use acks_late for at-least-once)"
        )


class NeverStarted(SemaphoreError):
    """Recorded as the result of a call that was handed room again and again but never started.

    Its message went to a queue no worker consumes, or no worker accepts its serializer.

    Attributes:
        gate: the gate's name.
        task_id: the call.
        queue: the queue its message was sent to.
        attempts: how many times it was handed room.
    """

    def __init__(self, gate: str, task_id: str, queue: str, attempts: int) -> None:
        super().__init__(gate, task_id, queue, attempts)
        self.gate = gate
        self.task_id = task_id
        self.queue = queue
        self.attempts = attempts

    def __str__(self) -> str:
        return (
            f"call {self.task_id} of gate {self.gate!r} was sent to queue {self.queue!r} "
            f"{self.attempts} times and never started: no worker consumes that queue or accepts "
            "the message (check the worker's -Q and accept_content)"
        )


class GateFull(SemaphoreError):
    """A call found no room while its gate already had ``max_pending`` calls waiting.

    Raised to the caller with ``on_full="reject"`` (nothing was stored), or recorded as the
    result of the call with ``on_full="drop"``.

    Attributes:
        gate: the gate's name.
        limit: its limit in force.
        pending: how many calls were waiting.
    """

    def __init__(self, gate: str, limit: int, pending: int) -> None:
        super().__init__(gate, limit, pending)
        self.gate = gate
        self.limit = limit
        self.pending = pending

    def __str__(self) -> str:
        return (
            f"gate {self.gate!r} is full: {self.pending} calls wait already (max_pending) and "
            f"its limit of {self.limit} is taken; the call was not kept"
        )


class WaitTimeout(SemaphoreError):
    """Recorded as the result of a call that waited for room longer than its ``wait_timeout``.

    Attributes:
        gate: the gate's name.
        task_id: the call.
        waited_s: how long it waited.
    """

    def __init__(self, gate: str, task_id: str, waited_s: float) -> None:
        super().__init__(gate, task_id, waited_s)
        self.gate = gate
        self.task_id = task_id
        self.waited_s = waited_s

    def __str__(self) -> str:
        return (
            f"call {self.task_id} waited {self.waited_s:.1f} s for room of gate {self.gate!r} "
            "(its wait_timeout) and was given up; it never ran"
        )


class RequirementFailed(SemaphoreError):
    """The result of a call that never ran because a call it required failed.

    Attributes:
        task: the failed requirement's task name.
        task_id: the failed requirement's id.
        error: its exception, as text (a ``RequirementFailed`` itself further down a graph).
    """

    def __init__(self, task: str, task_id: str, error: str) -> None:
        super().__init__(task, task_id, error)
        self.task = task
        self.task_id = task_id
        self.error = error

    def __str__(self) -> str:
        return f"requirement {self.task}[{self.task_id}] failed: {self.error}"


class WorkflowError(SemaphoreError, ValueError):
    """A workflow or a ``requires=`` option that cannot be run: a cycle, a requirement from
    another app, one that does not exist; nothing was stored."""


class AcquireTimeout(SemaphoreError):
    """``Semaphore.acquire(timeout=...)`` found no room in time; nothing is held.

    Attributes:
        gate: the gate's name.
        timeout_s: how long it waited.
    """

    def __init__(self, gate: str, timeout_s: float) -> None:
        super().__init__(gate, timeout_s)
        self.gate = gate
        self.timeout_s = timeout_s

    def __str__(self) -> str:
        return f"no room of gate {self.gate!r} within {self.timeout_s:g} s"


class ScriptError(SemaphoreError):
    """A Lua script answered with a code this version does not know."""

    def __init__(self, script: str, code: object) -> None:
        self.script = script
        self.code = code
        super().__init__(f"Lua script {script!r} returned unknown code {code!r}")
