"""Calls held ahead of their grant (``semaphore_prefetch``): the worker's side.

A call sent to the broker before it was granted reaches a worker whose ``task_prerun``
(:mod:`.signals`) finds it held: the pool thread waits on the call's wake list until the
release that grants it (see ``serve`` in lua/common.lua) marks it running here and wakes it.
"""

from __future__ import annotations

from typing import Any

import redis
from celery.utils.log import get_logger
from celery.worker import state as worker_state

from .errors import RedisUnavailable
from .outcome import Started
from .views import text

__all__ = ["confirmed", "hold"]

logger = get_logger(__name__)


def hold(rt: Any, group: Any, request: Any, runner: str, redeliver: bool) -> Any:
    """Hold a call sent ahead of its grant (``semaphore_prefetch``) until a release grants it.

    The release that grants it marks it running here and puts a token on its wake list: its
    fence and whether its result is wanted. The run begins at once; its confirmation goes to
    Redis without waiting for the answer, which ``task_postrun`` reads. The hold also looks
    again every so often (the call may have been cancelled or replaced meanwhile) and lets
    the call go when the worker stops, so that a warm shutdown is not held up by calls that
    wait. Redis unreachable while holding: the run is skipped, its message being in Redis.
    """
    # Shorter than the socket timeout, which would otherwise cut the wait as a stalled server.
    wait_s = max(0.05, min(1.0, rt.settings.redis_timeout_s / 2))
    key = group.wake_key(request.id)
    stopping = False
    while True:
        try:
            # A token "0" comes from the worker's main process at its shutdown (see
            # worker.let_go_of_held_calls); a thread of the threads pool sees the flag too.
            stopping = stopping or bool(worker_state.should_stop or worker_state.should_terminate)
            if not stopping:
                token = rt.client.blpop([key], timeout=wait_s)
                value = text(token[1]) if token is not None else ""
                if "," in value:
                    fence, wanted = value.split(",", 1)
                    request.semaphore_confirm = group.confirm(
                        request.id, runner, redeliver=redeliver
                    )
                    return Started.RUN, int(fence), "", wanted == "1", []
                stopping = value == "0"
            mode = "u" if stopping else "c"
            outcome = group.start(request.id, runner, redeliver=redeliver, mode=mode)
        except (redis.RedisError, RedisUnavailable) as exc:
            request.semaphore_unrecorded = "refused"
            if isinstance(exc, RedisUnavailable):
                raise
            raise RedisUnavailable(group.url, exc) from exc
        if outcome[0] is not Started.AHEAD:
            return outcome


def confirmed(request: Any) -> None:
    """Read the answer of a held call's confirmation (see :func:`hold`), before its release."""
    answer = getattr(request, "semaphore_confirm", None)
    if answer is None:
        return
    request.semaphore_confirm = None
    try:
        code = answer()
    except Exception as exc:  # the release still runs; lease expiry covers the rest
        logger.warning("gate: the run of held call %s could not be confirmed: %r", request.id, exc)
        return
    if code != Started.RUN:
        logger.warning("gate: held call %s: its run was not confirmed (code %s)", request.id, code)
