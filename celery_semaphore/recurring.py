"""Recurring calls: a signature sent every N seconds, a number of times, through its gates.

The schedules live in Redis (``{prefix:recurring}``), so they survive restarts of beat and of
the workers and are shared by every beat; the tick fires them (``tick.fire_recurring``),
taking each due occurrence in one script, so two beats fire it once. Each occurrence is an
ordinary gated call of the signature's task.
"""

from __future__ import annotations

import dataclasses

from celery import Celery
from celery.canvas import Signature
from kombu.utils import json

from .config import check_name, check_seconds
from .extension import install
from .runtime import Runtime, recurring_keys

__all__ = ["OVERLAP", "Recurring", "Schedule", "recurring"]

#: What an occurrence does when the previous one still waits or runs.
OVERLAP = ("skip", "queue", "replace")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A recurring schedule as stored in Redis."""

    name: str
    task: str
    every_s: float
    repeats: int | None
    overlap: str
    fired: int
    skipped: int
    next_ms: int
    last_id: str | None


def _keys(rt: Runtime) -> list[str]:
    return recurring_keys(rt.settings.key_prefix)


class Recurring:
    """The recurring schedules of an app (see :func:`recurring`)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.runtime = install(app)

    def add(
        self,
        name: str,
        signature: Signature,
        *,
        every: float,
        repeats: int | None = None,
        overlap: str = "skip",
        replace: bool = False,
    ) -> None:
        """Send ``signature`` every ``every`` seconds, ``repeats`` times (``None``: forever).

        The first occurrence fires at the next tick. ``overlap`` decides an occurrence due
        while the previous one still waits or runs: ``"skip"`` (counted as skipped),
        ``"queue"`` (sent anyway, it waits behind), ``"replace"`` (the waiting one is cancelled).

        Raises:
            ValueError / TypeError: a taken name (unless ``replace``), a period shorter than
                ``semaphore_tick_interval``, ``repeats`` below 1, an unknown ``overlap``, a
                signature of a task that is not registered or not gated.
        """
        where = f"recurring {name!r}"
        check_name(f"{where}: name", name)
        rt = self.runtime
        every_s = check_seconds(f"{where}: every", every)
        tick = rt.settings.tick_interval_s
        if every_s < tick:
            raise ValueError(
                f"{where}: every={every_s:g} s is shorter than semaphore_tick_interval "
                f"({tick:g} s), which fires the occurrences; lower semaphore_tick_interval"
            )
        if repeats is not None and (
            isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1
        ):
            raise ValueError(f"{where}: repeats must be an int >= 1 or None, got {repeats!r}")
        if overlap not in OVERLAP:
            raise ValueError(f"{where}: overlap must be one of {OVERLAP}, got {overlap!r}")
        if not isinstance(signature, Signature):
            raise TypeError(f"{where}: give a Celery signature (task.s(...)), got {signature!r}")
        task = signature.task
        if task not in self.app.tasks:
            raise ValueError(f"{where}: task {task!r} is not registered in this app")
        if rt.gates_of(task) is None:
            raise ValueError(f"{where}: task {task!r} is not gated (decorate it with @gated)")
        schedule = {
            "signature": dict(signature),
            "every_ms": int(every_s * 1000),
            "repeats": -1 if repeats is None else repeats,
            "overlap": overlap,
            "fired": 0,
            "skipped": 0,
        }
        body = json.dumps(schedule)  # an argument JSON cannot carry fails here, nothing stored
        stored = rt.scripts.recur_add(keys=_keys(rt), args=["", name, body, int(replace)])
        if not stored:
            raise ValueError(f"{where}: the name is taken; pass replace=True to replace it")

    def remove(self, name: str) -> bool:
        """Stop a schedule; returns whether it existed. Occurrences already sent go on."""
        schedules, due = _keys(self.runtime)
        client = self.runtime.client
        with client.pipeline() as pipe:
            pipe.hdel(schedules, name)
            pipe.zrem(due, name)
            removed, _ = pipe.execute()
        return bool(removed)

    def list(self) -> list[Schedule]:
        """Every schedule, by name."""
        schedules, _ = _keys(self.runtime)
        out = []
        for raw_name, raw in sorted(self.runtime.client.hgetall(schedules).items()):
            doc = json.loads(raw)
            out.append(
                Schedule(
                    name=raw_name.decode() if isinstance(raw_name, bytes) else raw_name,
                    task=doc["signature"]["task"],
                    every_s=doc["every_ms"] / 1000.0,
                    repeats=None if doc["repeats"] < 0 else doc["repeats"],
                    overlap=doc["overlap"],
                    fired=doc.get("fired", 0),
                    skipped=doc.get("skipped", 0),
                    next_ms=doc.get("next_ms", 0),
                    last_id=doc.get("last_id"),
                )
            )
        return out


def recurring(app: Celery) -> Recurring:
    """The recurring schedules of ``app``.

    Examples:
        >>> recurring(app).add("abc", fetch.s(k=10), every=3, repeats=5, overlap="skip")
        >>> recurring(app).remove("abc")
    """
    return Recurring(app)
