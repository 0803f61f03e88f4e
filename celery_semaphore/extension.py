"""``install(app)``: the one place where celery_semaphore touches a Celery app.

It replaces the app's ``amqp.send_task_message`` with the gated :class:`Publisher`, connects
the signal receivers, adds the keepalive bootstep, guards every task's run in a worker and
registers the ``celery_semaphore.tick`` task and its beat entry. Everything is idempotent;
importing the package does none of it.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from celery import Celery
from celery._state import get_current_app

from . import signals, worker
from .errors import ConfigurationError
from .followups import fail_fast, follow
from .group import Release
from .publish import Publisher
from .results import cancel_call
from .runtime import Runtime, runtime_for
from .scheduler import Scheduler
from .spec import specs_of
from .tick import register_tick

__all__ = ["cancel", "install", "install_if_gated"]

_lock = threading.RLock()


def install(app: Celery) -> Runtime:
    """Install celery_semaphore on ``app``; calling it again returns the same runtime.

    The first ``@gated`` task of an app calls this, so users rarely need to.

    Args:
        app: the Celery application.

    Returns:
        The app's :class:`~celery_semaphore.runtime.Runtime`.

    Examples:
        >>> app = Celery("proj", broker="redis://localhost:6379/0")
        >>> app.conf.semaphore_limits = {"crawler": 4}
        >>> rt = install(app)
    """
    with _lock:
        rt = runtime_for(app)
        if rt is not None:
            return rt
        rt = runtime_for(app, create=True)
        assert rt is not None
        # amqp.send_task_message is a cached_property: an instance attribute replaces it.
        app.amqp.send_task_message = Publisher(rt)
        rt.scheduler_factory = _build_scheduler
        rt.follow = functools.partial(follow, rt)
        rt.on_node_failed = functools.partial(fail_fast, rt)
        signals.connect()
        worker.connect_worker_init()
        app.steps["worker"].add(worker.Keepalive)
        register_tick(app)
        return rt


def install_if_gated(app: Celery) -> None:
    """Install on ``app`` when one of its tasks is gated (a hook run when an app is finalized).

    Celery runs its finalize hooks in no set order, so a ``@shared_task`` may be registered
    after this hook ran: the check is made again once the app is finalized.
    """

    def check(**_: Any) -> None:
        if runtime_for(app) is None and any(specs_of(t) for t in list(app._tasks.values())):
            install(app)

    check()
    app.on_after_finalize.connect(check, weak=False, dispatch_uid=f"celery_semaphore.{id(app)}")


def _build_scheduler(rt: Runtime) -> Scheduler | None:
    """The app's Scheduler for ``semaphore_slots`` (``None`` when there are none).

    Raises:
        ConfigurationError: ``semaphore_slots`` is invalid, or defines the slots of a gate
            that ``semaphore_limits`` sizes too.
    """
    if not rt.settings.slots:
        return None

    def dispatch(group: str, outcome: Release | Any) -> None:
        rt.dispatch(group, outcome.grants, outcome.malformed)

    scheduler = Scheduler(
        {"app": rt.app, "redis_c": rt.client, "runtime": rt},
        prefix=rt.settings.key_prefix,
        group_factory=lambda name: rt.group(rt.settings.groups.get(name, name)),
        dispatch=dispatch,
    )
    scheduler.load(rt.settings.slots)
    both = sorted(set(scheduler.semaphores) & set(rt.settings.limits))
    if both:
        raise ConfigurationError(
            f"gate {both[0]!r} is sized by semaphore_limits and by semaphore_slots; "
            "define its slots in one of them"
        )
    return scheduler


def cancel(result: Any, app: Celery | None = None) -> str:
    """Cancel a call that has not started: it never runs, and its result says REVOKED.

    Works in every state before the run: waiting for its start time, parked, or handed room
    and sent to the broker (a copy a worker receives later is refused). A call that runs
    already is left alone: revoke it with Celery as usual.

    Args:
        result: the call's ``AsyncResult`` or task id.
        app: the Celery app (default: the result's app, else the current app).

    Returns:
        The state the call was cancelled in (``"waiting"``, ``"parked"``, ``"granted"``),
        ``"running"`` when it runs (nothing changed), or ``""`` when no gate knows it.
    """
    app = app or getattr(result, "app", None) or get_current_app()
    rt = runtime_for(app)
    if rt is None:
        return ""
    return cancel_call(rt, str(getattr(result, "id", result)))
