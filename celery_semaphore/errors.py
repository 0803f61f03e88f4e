"""The exceptions celery_semaphore raises: one root, a subclass per condition."""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "LeaseLost",
    "RedisUnavailable",
    "ScriptError",
    "SemaphoreError",
]


class SemaphoreError(Exception):
    """Root of every error raised by celery_semaphore."""


class ConfigurationError(SemaphoreError, ValueError):
    """A setting or decorator option is missing or has a wrong value.

    It is also a ``ValueError``, so code that validates input generically catches it.
    """


class RedisUnavailable(SemaphoreError):
    """The Redis server that holds the slots could not be reached.

    Deliberately not an ``OSError``: kombu would re-raise those as its own OperationalError
    and hide the URL from the caller.

    Attributes:
        url: the Redis URL (password masked) that was tried.
    """

    def __init__(self, url: str, cause: BaseException | None = None) -> None:
        self.url = url
        detail = f": {cause}" if cause is not None else ""
        super().__init__(
            f"cannot reach the semaphore Redis at {url}{detail}. Check that the server runs "
            "and that the setting semaphore_redis_url names it; nothing was written for this call."
        )


class LeaseLost(SemaphoreError):
    """A running call no longer holds its slot (its lease expired and was reclaimed).

    Attributes:
        gate: the semaphore's name.
        task_id: the call whose lease was lost.
    """

    def __init__(self, gate: str, task_id: str) -> None:
        self.gate = gate
        self.task_id = task_id
        super().__init__(f"call {task_id} lost its slot of semaphore {gate!r}")


class CallDropped(SemaphoreError):
    """Recorded as the result of a call whose worker died while it ran, with no redelivery.

    With early acknowledgement (Celery's default) the broker forgets a message once a worker
    takes it; if that worker dies, the tick reclaims the slot and records this as the call's
    final state, so a caller waiting on the result learns it.

    Attributes:
        gate: the semaphore's name.
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
            f"call {self.task_id} of semaphore {self.gate!r} was dropped: its worker "
            f"({self.runner or 'unknown'}) died while it ran and the broker will not redeliver it "
            "(use acks_late for at-least-once)"
        )


class ScriptError(SemaphoreError):
    """A Lua script answered with a code this version does not know."""

    def __init__(self, script: str, code: object) -> None:
        self.script = script
        self.code = code
        super().__init__(f"Lua script {script!r} returned unknown code {code!r}")
