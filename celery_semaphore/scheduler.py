"""The Scheduler: slots that keep their state in Redis and poll their backends for work.

A semaphore of N slots is a gate of limit N; each slot holds one unit while it runs a task.
Parked ``@gated`` calls of the same gate are handed room by the scripts themselves, in the
step that frees it; idle slots poll their backends when the gate has room.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis
from celery.utils.log import get_logger

from .backends.base import AbstractBackend
from .backends.gated import GatedCalls
from .errors import ConfigurationError
from .group import Claimed, Group
from .scripts import Scripts
from .slot import (
    DEFAULT_SLOT_TIMEOUT_S,
    AbstractSlot,
    SlotConfig,
    parse_slot_configs,
)

__all__ = ["DEFAULT_SLOT_TIMEOUT_S", "Scheduler", "SlotConfig", "parse_slot_configs"]

logger = get_logger(__name__)

GroupFactory = Callable[[str], Group]
Dispatch = Callable[[str, Any], Any]  # (group, a Release or a Reclaim)


class Scheduler:
    """Owns slots; each visit stops timed-out tasks and fills idle slots from their backends.

    Args:
        context: handed to every backend; standalone, it must hold a redis-py client as
            ``'redis_c'``; under Celery it also holds the app as ``'app'``.
        prefix: first part of every Redis key (``semaphore_key_prefix`` under Celery).
        group_factory: returns the Group a semaphore lives in (the Celery runtime passes its
            own); by default a group named after the semaphore on ``context['redis_c']``.
        dispatch: publishes the calls a release handed room (under Celery).

    Examples:
        >>> scheduler = Scheduler({"redis_c": redis.Redis()}).load(
        ...     [{"backends": ["MyBackend"], "slot_cls": "RedisSlot", "slot_id": 1}]
        ... )
        >>> scheduler.schedule()
    """

    def __init__(
        self,
        context: Mapping[str, Any] | None = None,
        *,
        prefix: str = "semaphore",
        group_factory: GroupFactory | None = None,
        dispatch: Dispatch | None = None,
    ) -> None:
        self.context = dict(context or {})
        self.prefix = prefix
        self.slots: list[AbstractSlot] = []
        self._group_factory = group_factory or self._default_group
        self._dispatch = dispatch
        self._groups: dict[str, Group] = {}  # semaphore -> its group
        self._slots_of: dict[str, list[AbstractSlot]] = defaultdict(list)
        self._backends: dict[tuple[str, str], AbstractBackend] = {}

    def _default_group(self, name: str) -> Group:
        client = self.context.get("redis_c")
        if not isinstance(client, redis.Redis):
            raise ConfigurationError(
                "Scheduler needs a redis-py client in its context: Scheduler({'redis_c': "
                "redis.Redis(...)})"
            )
        return Group(client, Scripts(client), name, prefix=self.prefix)

    def load(self, configs: Iterable[Mapping[str, Any]]) -> Scheduler:
        """Validate ``configs`` as a whole, then add their slots; returns the scheduler.

        Raises:
            ConfigurationError: see :func:`parse_slot_configs`; also a ``slot_id`` or a
                semaphore that an earlier ``load`` already defined.
        """
        parsed = parse_slot_configs(list(configs))
        known_ids = {slot.slot_id for slot in self.slots}
        by_semaphore: dict[str, list[SlotConfig]] = defaultdict(list)
        for cfg in parsed:
            if cfg.slot_id in known_ids:
                raise ConfigurationError(f"slot_id {cfg.slot_id!r} is already loaded")
            by_semaphore[cfg.semaphore].append(cfg)
        for name in by_semaphore:
            if name in self._groups:
                raise ConfigurationError(
                    f"the slots of semaphore {name!r} are already defined; give all of them in "
                    "one list"
                )
        for name, cfgs in by_semaphore.items():
            group = self._groups[name] = self._group_factory(name)
            for number, cfg in enumerate(cfgs, start=1):
                backends = [self._backend_instance(name, group, cls) for cls in cfg.backends]
                slot = cfg.slot_cls(group, name, str(number), cfg.slot_id, backends, cfg.timeout_s)
                slot.size = len(cfgs)
                self.slots.append(slot)
                self._slots_of[name].append(slot)
        return self

    def _backend_instance(
        self, name: str, group: Group, cls: type[AbstractBackend]
    ) -> AbstractBackend:
        key = (name, cls.__name__)
        if key not in self._backends:
            context = {**self.context, "group": group, "gate": name, "scheduler": self}
            self._backends[key] = cls(context)
        return self._backends[key]

    # -- lookups -----------------------------------------------------------------------

    @property
    def semaphores(self) -> list[str]:
        """The semaphores (gates) that have slots here."""
        return list(self._groups)

    def group_of(self, semaphore: str) -> Group | None:
        """The Group the slots of ``semaphore`` live in, or ``None``."""
        return self._groups.get(semaphore)

    def groups(self) -> list[str]:
        """Names of the groups the slots live in."""
        return sorted({g.name for g in self._groups.values()})

    def size(self, semaphore: str) -> int:
        """Number of slots of ``semaphore`` (the limit of its gate)."""
        return len(self._slots_of.get(semaphore, ()))

    def backend(self, semaphore: str, name: str) -> AbstractBackend | None:
        """The backend instance ``name`` of ``semaphore``."""
        return self._backends.get((semaphore, name or GatedCalls.__name__))

    # -- the three operations ------------------------------------------------------------

    def schedule(self) -> dict[str, dict[str, int]]:
        """Visit every slot: stop timed-out tasks, then start work in idle slots.

        Returns ``{semaphore: {"timed_out": n, "started": n}}``. Two schedulers running at
        once never start two tasks in one slot: every claim is one script.
        """
        summary: dict[str, dict[str, int]] = {}
        for name, group in list(self._groups.items()):
            outcome = group.reclaim()
            timed_out = 0
            for row in outcome.reclaimed:
                if row.backend:
                    timed_out += 1
                    logger.warning(
                        "semaphore %r: the task %s in slot %s timed out (runner %s); its worker "
                        "died or stopped renewing its lease",
                        name,
                        row.task_id,
                        row.slot or "?",
                        row.runner or "-",
                    )
                    self.timed_out(name, row.task_id, row.backend)
            if self._dispatch is not None:
                self._dispatch(group.name, outcome)
            summary[name] = {"timed_out": timed_out, "started": self._fill(name)}
        return summary

    def timed_out(self, semaphore: str, task_id: str, backend_name: str) -> None:
        """Run ``timeout_callback`` then ``stop_callback`` of the backend that started a task."""
        for name in self._names_for(semaphore):
            backend = self.backend(name, backend_name)
            if backend is not None:
                _call(backend, "timeout_callback", task_id)
                _call(backend, "stop_callback", task_id)
                return

    def keepalive(self, task_id: str, *, semaphore: str | None = None) -> bool:
        """Keep the slot running ``task_id`` alive; returns whether a slot runs it."""
        for name in self._candidates(semaphore):
            group = self._groups[name]
            lost, backends = group.keepalive({task_id: [name]}, int(DEFAULT_SLOT_TIMEOUT_S * 1000))
            self.notify_keepalive(group.name, backends)
            if task_id not in lost:
                return True
        return False

    def notify_keepalive(self, group: str, backends: Mapping[str, str]) -> None:
        """Call ``keepalive_callback`` for ``{task id: backend name}`` of a group."""
        for task_id, backend_name in backends.items():
            for name in self._names_for(group):
                backend = self.backend(name, backend_name)
                if backend is not None:
                    _call(backend, "keepalive_callback", task_id)
                    break

    def stop(self, task_id: str, *, semaphore: str | None = None, fence: int | None = None) -> bool:
        """Free the slot running ``task_id`` so another task may start in it.

        Returns whether a slot was freed. Stopping twice, or a task whose slot was already
        reclaimed, changes nothing.
        """
        for name in self._candidates(semaphore):
            group = self._groups[name]
            outcome = group.release(task_id, fence)
            if self._dispatch is not None:
                self._dispatch(group.name, outcome)
            if outcome.released:
                self.stopped(name, task_id, outcome.backend)
                return True
        return False

    def stopped(self, semaphore: str, task_id: str, backend_name: str) -> None:
        """A task a backend started ended: ``stop_callback``, then idle slots poll again."""
        for name in self._names_for(semaphore):
            backend = self.backend(name, backend_name) if backend_name else None
            if backend is not None:
                _call(backend, "stop_callback", task_id)
            self._fill(name)
            return

    def fill(self, group: str) -> int:
        """Let the idle slots of the semaphores in ``group`` poll; returns tasks started."""
        return sum(self._fill(name) for name in self._names_for(group))

    # -- internals ---------------------------------------------------------------------

    def _names_for(self, name: str) -> list[str]:
        """Semaphores named ``name`` or living in group ``name``."""
        if name in self._groups:
            return [name]
        return [s for s, g in self._groups.items() if g.name == name]

    def _candidates(self, semaphore: str | None) -> list[str]:
        if semaphore is None:
            return list(self._groups)
        return self._names_for(semaphore)

    def _fill(self, name: str) -> int:
        group = self._groups[name]
        occupied = group.slots(name)
        started = 0
        for slot in self._slots_of[name]:
            if slot.number not in occupied and self._visit(slot):
                started += 1
        return started

    def _visit(self, slot: AbstractSlot) -> bool:
        """Poll an idle slot's backends in order and start the first task any returns."""
        for backend in slot.backends:
            if isinstance(backend, GatedCalls):
                continue  # the scripts hand room to parked gated calls themselves
            try:
                found = backend.poll()
            except Exception:
                logger.exception(
                    "backend %s of semaphore %r: poll() failed; skipped this time",
                    backend.name,
                    slot.semaphore,
                )
                continue
            if found is None:
                continue
            task_id = str(found)
            outcome, fence = slot.claim(task_id, backend)
            if outcome in (Claimed.SLOT_BUSY, Claimed.RECOVERING):
                return False  # another scheduler filled it, or no room: it stays with its backend
            if outcome in (Claimed.ALREADY_HELD, Claimed.ENDED):
                continue
            try:
                launched = backend.start_callback(task_id)
                if launched is not None and hasattr(launched, "apply_async"):
                    self._send(slot, task_id, launched)
            except Exception:
                logger.exception(
                    "backend %s of semaphore %r: start_callback(%s) failed; the slot is free again",
                    backend.name,
                    slot.semaphore,
                    task_id,
                )
                outcome_release = slot.group.release(task_id, fence)
                if self._dispatch is not None:
                    self._dispatch(slot.group.name, outcome_release)
                return False
            return True
        return False

    def _send(self, slot: AbstractSlot, task_id: str, signature: Any) -> None:
        # The headers make the worker's receivers keep the slot alive and free it at the end
        # of the run (and its guard enforce the verdict), whether or not the task is @gated.
        signature.apply_async(
            task_id=task_id,
            headers={"semaphore_gate": slot.group.name, "semaphore_gates": slot.semaphore},
        )


def _call(backend: AbstractBackend, method: str, task_id: str, *args: Any) -> None:
    # A callback that raises is logged with its backend's name; the scheduler carries on.
    try:
        getattr(backend, method)(task_id, *args)
    except Exception:
        logger.exception("backend %s: %s(%s) raised", backend.name, method, task_id)
