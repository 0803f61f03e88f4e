"""``Semaphore``: a gate used from any code, as a distributed semaphore (a lock at limit 1).

It shares its units with the gated tasks of the same gate name: a hold is a call of the
gate like any other (its order, its priority, its lease), held by a plain process or thread
instead of a task. A blocked ``acquire`` waits in the gate's line, not in a polling loop: the
release that frees room wakes it through Redis pub/sub.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Celery
from celery._state import get_current_app

from .config import check_lease, check_limit, check_name, check_priority
from .errors import AcquireTimeout, ConfigurationError
from .extension import install
from .graph import gate_dot
from .group import Acquired, Group, Started
from .operations import GateOperations
from .runtime import LOCK_MESSAGE, Runtime, wake_channel
from .spec import CallSpec

__all__ = ["Hold", "Semaphore"]

F = TypeVar("F", bound=Callable[..., Any])

#: How often a waiting hold also reads its record, should its wake-up message be lost.
_POLL_S = 0.5


class Hold:
    """Room of a gate held by this process; truthy; :meth:`release` gives it back.

    A background thread renews its lease every third of it while it is held; a process that
    dies holding it loses it within lease + tick interval.
    """

    def __init__(self, semaphore: Semaphore, hold_id: str, fence: int) -> None:
        self.semaphore = semaphore
        self.id = hold_id
        self.fence = fence
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._renew, name=f"semaphore-hold-{hold_id[-8:]}", daemon=True
        )
        self._thread.start()

    def _renew(self) -> None:
        sem = self.semaphore
        while not self._stop.wait(sem.lease_s / 3.0):
            try:
                sem.group.keepalive({self.id: [sem.name]}, int(sem.lease_s * 1000))
            except Exception:  # Redis away for a moment: the next renewal tries again
                continue

    def release(self) -> bool:
        """Give the room back (idempotent); returns whether it was still held."""
        if self._stop.is_set():
            return False
        self._stop.set()
        released = self.semaphore.runtime.release(self.semaphore.group.name, self.id, self.fence)
        return bool(released)

    def __bool__(self) -> bool:
        return not self._stop.is_set()

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Semaphore(GateOperations):
    """A gate, for code that is not a task, and the admin API of a gate (see
    :class:`~celery_semaphore.operations.GateOperations`: status, holders, parked, resize,
    pause, resume, cancel, purge, metrics).

    Args:
        name: the gate's name (shared with ``@gated(name)`` tasks).
        app: the Celery app whose settings and Redis it uses (default: the current app).
        limit: the limit, when neither a gated task nor ``semaphore_limits`` gives one.
        lease: seconds a hold lasts without a renewal (default ``semaphore_lease``).
        priority: the priority of this semaphore's holds in the gate's line (0-255).

    Examples:
        >>> maintenance = Semaphore("maintenance", app=app)
        >>> with maintenance:                       # blocks until it holds the gate
        ...     rebuild_index()
        >>> with maintenance.acquire(timeout=10):   # AcquireTimeout after 10 s
        ...     ...
        >>> hold = maintenance.acquire(blocking=False)  # a Hold, or None when busy
        >>> @maintenance
        ... def compact(): ...
    """

    def __init__(
        self,
        name: str,
        app: Celery | None = None,
        *,
        limit: int | None = None,
        lease: float | None = None,
        priority: int = 0,
    ) -> None:
        self.name = check_name("a gate name", name)
        self.app = app or get_current_app()
        self.runtime: Runtime = install(self.app)
        self._limit = None if limit is None else check_limit(name, limit)
        self._lease = None if lease is None else check_lease(f"Semaphore({name!r}): lease", lease)
        self.priority = check_priority(f"Semaphore({name!r})", priority)
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"<Semaphore {self.name!r}>"

    @functools.cached_property
    def group(self) -> Group:
        """The Redis group the gate lives in (resolved once: it does not move)."""
        return self.runtime.group_of_gate(self.name)

    @property
    def lease_s(self) -> float:
        """The lease of a hold."""
        return self._lease if self._lease is not None else self.runtime.settings.lease_s

    def configured_limit(self) -> int:
        """The limit this process would seed: a gated task's, ``semaphore_limits``, ``limit=``.

        Raises:
            ConfigurationError: none of them gives one.
        """
        for gates in self.runtime.task_gates():
            if self.name in gates.names:
                return gates.limits[gates.names.index(self.name)]
        limit = self.runtime.settings.limits.get(self.name, self._limit)
        if limit is None:
            raise ConfigurationError(
                f"gate {self.name!r} has no limit: add it to semaphore_limits or pass "
                f"Semaphore({self.name!r}, limit=N)"
            )
        return limit

    # -- holding ------------------------------------------------------------------------

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> Hold | None:
        """Hold one unit of the gate.

        Args:
            blocking: wait in the gate's line for room; ``False`` returns ``None`` at once
                when there is none (nothing is kept then).
            timeout: seconds to wait at most; ``None`` waits for good.

        Returns:
            A :class:`Hold` (a context manager), or ``None`` when not blocking and busy.

        Raises:
            AcquireTimeout: no room within ``timeout``; nothing is held or kept.
            ValueError: ``timeout`` is negative.
        """
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout < 0):
            raise ValueError(
                f"Semaphore({self.name!r}).acquire: timeout must be >= 0, got {timeout!r}"
            )
        rt, group = self.runtime, self.group
        rt.register_group(group.name)
        hold_id = f"lock-{uuid.uuid4().hex}"
        call = CallSpec(
            keys=("",),
            weights=(1,),
            key_limits=(0,),
            priority=self.priority,
            lease_ms=int(self.lease_s * 1000),
            redeliver=True,  # no result to record: a dead holder is simply reclaimed
        )
        pubsub = rt.client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(wake_channel(rt.settings.key_prefix, hold_id))
        try:
            admission = group.acquire(
                hold_id,
                call.to_json((self.name,)),
                [self.configured_limit()],
                LOCK_MESSAGE + hold_id.encode(),
                lease_ms=call.lease_ms,
            )
            rt.dispatch(group.name, admission.grants)
            granted = admission.outcome is Acquired.GRANTED
            if not granted and (not blocking or not self._wait(pubsub, hold_id, timeout)):
                self._give_up(hold_id)
                if not blocking:
                    return None
                raise AcquireTimeout(self.name, float(timeout or 0))
        finally:
            pubsub.close()
        verdict, fence, *_ = group.start(hold_id, _runner(), redeliver=True)
        if verdict is not Started.RUN:  # reclaimed while we were about to start: try again
            return self.acquire(blocking, timeout)
        return Hold(self, hold_id, fence)

    def _wait(self, pubsub: Any, hold_id: str, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
            if left <= 0:
                return False
            if pubsub.get_message(timeout=left) is not None:
                return True
            record = self.group.record(hold_id)
            if record is not None and record.get("state") == "granted":
                return True

    def _give_up(self, hold_id: str) -> None:
        _, grants = self.group.cancel(hold_id)
        self.runtime.dispatch(self.group.name, grants)

    def to_dot(self) -> str:
        """The live picture of the gate as Graphviz DOT: holders, next parked calls and
        their requirements (``graph.to_svg`` renders it)."""
        return gate_dot(self.group, self.name)

    def __enter__(self) -> Hold:
        hold = self.acquire()
        assert hold is not None
        stack = getattr(self._local, "holds", None)
        if stack is None:
            stack = self._local.holds = []
        stack.append(hold)
        return hold

    def __exit__(self, *exc: object) -> None:
        self._local.holds.pop().release()

    def __call__(self, fun: F) -> F:
        """Use the semaphore as a decorator: every call of ``fun`` holds one unit."""

        @functools.wraps(fun)
        def held(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fun(*args, **kwargs)

        return held  # type: ignore[return-value]

    # -- looking -----------------------------------------------------------------------

    def limit(self) -> int | None:
        """The limit in force (stored in Redis), or ``None`` while nothing named the gate."""
        return self.group.limit(self.name)

    def held(self) -> int:
        """Units of the gate held now (tasks and holds, weights counted)."""
        return self.group.used(self.name)


def _runner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
