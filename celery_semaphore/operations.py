"""What an operator does to a gate, as methods of :class:`~celery_semaphore.Semaphore`.

Each change is one script (see lua/operate.lua, resize.lua, cancel.lua), journalled with the
operator's host and pid; each read is one pipelined pass (see :mod:`.admin`,
:mod:`.listing`). ``celery semaphore`` and the dashboard call these.
"""

from __future__ import annotations

from celery import Celery

from .admin import (
    SEP,
    GateStatus,
    Metrics,
    Operation,
    journal,
    known_gates,
    metrics,
    operator,
    status,
)
from .config import check_limit
from .extension import install
from .group import Group
from .listing import Holder, ParkedCall, holders, parked
from .results import record_revoked
from .runtime import Runtime

__all__ = ["GateOperations", "gates"]

#: Calls a purge cancels per script (it repeats until none is left).
PURGE_BATCH = 500


class GateOperations:
    """The admin API of one gate (mixed into ``Semaphore``)."""

    name: str
    runtime: Runtime

    @property
    def group(self) -> Group:
        """The group the gate lives in."""
        return self.runtime.group_of_gate(self.name)

    def status(self) -> GateStatus:
        """Limit, held, parked, waiting, oldest parked age, paused, busiest keys, counters."""
        return status(self.group, self.name)

    def holders(self) -> list[Holder]:
        """The calls holding the gate: task, key, worker and pid, held for, lease left, fence."""
        return holders(self.group, self.name)

    def parked(self, offset: int = 0, count: int = 50) -> list[ParkedCall]:
        """The calls waiting for room, in release order (a page of them)."""
        return parked(self.group, self.name, offset, count)

    def metrics(self) -> Metrics:
        """Counters and wait / hold histograms of the gate."""
        return metrics(self.group, self.name)

    def journal(self, count: int = 20) -> list[Operation]:
        """The last operations on the gate's group, newest first."""
        return journal(self.group, count)

    def resize(self, limit: int, *, key: str | None = None) -> int | None:
        """Set the limit in force, live: lowering it stops new grants until the gate is under
        it (nothing running is killed); raising it hands room to parked calls at once.

        With ``key``, set that key's limit instead (``limit`` 0 returns it to the configured
        one). Returns the old gate limit (``None`` for a key).
        """
        group = self.group
        if key is not None:
            arg = f"{key}{SEP}{check_limit(self.name, limit) if limit else ''}"
            _, grants = group.operate("key-limit", self.name, arg, who=operator())
            self.runtime.dispatch(group.name, grants)
            return None
        old, grants = group.resize(self.name, check_limit(self.name, limit), who=operator())
        self.runtime.dispatch(group.name, grants)
        return old

    def pause(self) -> None:
        """Stop handing room out: parked calls stay parked and new calls park too."""
        self.group.operate("pause", self.name, who=operator())

    def resume(self) -> None:
        """Hand room out again, at once."""
        _, grants = self.group.operate("resume", self.name, who=operator())
        self.runtime.dispatch(self.group.name, grants)

    def cancel(self, task_id: str, *, terminate: bool = False) -> str:
        """Cancel a call of the gate: one that waits never runs (REVOKED, its dependents
        cancelled); one that runs is revoked with Celery (killed only with ``terminate``) and
        its units come back at its end. Returns the state it was in ("" when unknown here).
        """
        group = self.group
        state, grants = group.cancel(task_id, reason=f"cancelled by {operator()}", who=operator())
        self.runtime.dispatch(group.name, grants)
        if state == "running":
            self.runtime.app.control.revoke(task_id, terminate=terminate)
        elif state:
            record_revoked(self.runtime.app, task_id, f"cancelled while {state}")
        return state

    def purge(self) -> int:
        """Cancel every parked call of the gate; returns how many (each ends REVOKED)."""
        group, total = self.group, 0
        while True:
            ids, grants = group.operate("purge", self.name, str(PURGE_BATCH), who=operator())
            self.runtime.dispatch(group.name, grants)
            for task_id in ids:
                record_revoked(self.runtime.app, task_id, "purged from its gate")
            total += len(ids)
            if len(ids) < PURGE_BATCH:
                return total


def gates(app: Celery) -> list[GateStatus]:
    """Every gate known to the app (its tasks and settings) and to Redis, with its status."""
    rt = install(app)
    return [status(rt.group(group), gate) for gate, group in known_gates(rt).items()]
