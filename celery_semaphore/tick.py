"""The beat task ``celery_semaphore.tick`` and its place in the beat schedule."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.utils.log import get_logger

from .config import DEFAULTS, check_seconds

__all__ = ["register_tick"]

logger = get_logger(__name__)


def register_tick(app: Celery) -> None:
    """Register the tick task on ``app`` and add it to the beat schedule once configured."""
    from .extension import TICK_TASK, extension_for

    def tick(self: Any) -> dict[str, Any]:
        ext = extension_for(self.app)
        return ext.tick() if ext is not None else {}

    tick.__name__ = "tick"
    tick.__doc__ = "Reclaim expired leases and dispatch parked calls into free slots."
    app.task(name=TICK_TASK, bind=True, ignore_result=True, shared=False)(tick)

    def schedule(sender: Celery | None = None, **_: Any) -> None:
        # Runs inside Celery's on_after_configure signal, which swallows exceptions: log them.
        try:
            interval = check_seconds(
                "semaphore_tick_interval",
                app.conf.get("semaphore_tick_interval", DEFAULTS["semaphore_tick_interval"]),
            )
            app.add_periodic_task(interval, app.signature(TICK_TASK), name=TICK_TASK)
        except Exception:
            logger.exception("celery_semaphore: could not add %s to the beat schedule", TICK_TASK)

    if app.configured:
        schedule()
    else:
        app.on_after_configure.connect(schedule, weak=False, dispatch_uid=f"{TICK_TASK}.{id(app)}")
