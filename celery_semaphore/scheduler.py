"""The Scheduler: slots that keep their state in Redis and poll their backends for work.

A semaphore of size N is N slots sharing a backend list. ``@gated`` calls are one backend of
this model, :class:`~celery_semaphore.backends.GatedCalls`: slots whose first backend it is
are handed the next parked call by the release script itself, in the step that frees them.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import redis
from celery.utils.log import get_logger

from .backends.base import AbstractBackend, resolve_backend, resolve_class
from .backends.gated import GatedCalls
from .config import check_seconds
from .errors import ConfigurationError
from .gate import Claimed, Gate, Grant, Malformed
from .scripts import Scripts
from .slot import AbstractSlot

__all__ = ["Scheduler", "SlotConfig", "parse_slot_configs", "DEFAULT_SLOT_TIMEOUT_S"]

logger = get_logger(__name__)

#: Seconds a slot's task may go without a keepalive before it is stopped.
DEFAULT_SLOT_TIMEOUT_S = 300.0
DEFAULT_SEMAPHORE = "slots"
_REQUIRED = ("backends", "slot_cls", "slot_id")
_ALLOWED = {*_REQUIRED, "timeout", "semaphore"}

GateFactory = Callable[[str, int, float], Gate]


@dataclasses.dataclass(frozen=True)
class SlotConfig:
    """One validated entry of a slot configuration list."""

    slot_id: Hashable
    backends: tuple[type[AbstractBackend], ...]
    slot_cls: type[AbstractSlot]
    timeout_s: float
    semaphore: str

    @property
    def serves_gated_calls_first(self) -> bool:
        """Whether parked ``@gated`` calls are this slot's first source of work."""
        return self.backends[0] is GatedCalls


def parse_slot_configs(configs: object, setting: str = "slots") -> list[SlotConfig]:
    """Validate a whole slot configuration list before anything runs.

    Raises:
        ConfigurationError: a missing or unknown key, a duplicate ``slot_id``, an unknown
            backend or slot class (the message lists the known names), a backend that does
            not override ``start_callback``, a bad timeout.
    """
    if not isinstance(configs, (list, tuple)):
        raise ConfigurationError(f"{setting} must be a list of slot dicts, got {configs!r}")
    parsed: list[SlotConfig] = []
    seen: set[Hashable] = set()
    for index, entry in enumerate(configs):
        where = f"{setting}[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigurationError(f"{where} must be a dict, got {entry!r}")
        missing = [key for key in _REQUIRED if key not in entry]
        if missing:
            raise ConfigurationError(f"{where} is missing {', '.join(map(repr, missing))}")
        unknown = sorted(set(entry) - _ALLOWED)
        if unknown:
            raise ConfigurationError(
                f"{where} has unknown keys {unknown}; allowed: {sorted(_ALLOWED)}"
            )
        slot_id = entry["slot_id"]
        if not isinstance(slot_id, Hashable) or slot_id in seen:
            raise ConfigurationError(f"{where}: duplicate or unhashable slot_id {slot_id!r}")
        seen.add(slot_id)
        refs = entry["backends"]
        if isinstance(refs, (str, type)) or not isinstance(refs, Sequence) or not refs:
            raise ConfigurationError(f"{where}: 'backends' must be a non-empty list, got {refs!r}")
        semaphore = entry.get("semaphore", DEFAULT_SEMAPHORE)
        if not isinstance(semaphore, str) or not semaphore or "{" in semaphore or "}" in semaphore:
            raise ConfigurationError(f"{where}: bad semaphore name {semaphore!r}")
        parsed.append(
            SlotConfig(
                slot_id=slot_id,
                backends=tuple(resolve_backend(ref, f"{where}.backends") for ref in refs),
                slot_cls=resolve_class(
                    entry["slot_cls"],
                    AbstractSlot.registry,
                    AbstractSlot,
                    "slot class",
                    f"{where}.slot_cls",
                ),
                timeout_s=check_seconds(
                    f"{where}.timeout", entry.get("timeout", DEFAULT_SLOT_TIMEOUT_S)
                ),
                semaphore=semaphore,
            )
        )
    return parsed


class Scheduler:
    """Owns slots; each visit stops timed-out tasks and fills idle slots from their backends.

    Args:
        context: handed to every backend; standalone, it must hold a redis-py client as
            ``'redis_c'``; under Celery it also holds the app as ``'app'``.
        prefix: first part of every Redis key (``semaphore_key_prefix`` under Celery).
        gate_factory: builds the Gate of a semaphore (the Celery extension passes its own).

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
        gate_factory: GateFactory | None = None,
    ) -> None:
        self.context = dict(context or {})
        self.prefix = prefix
        self.slots: list[AbstractSlot] = []
        self._gate_factory = gate_factory or self._default_gate
        self._gates: dict[str, Gate] = {}
        self._slots_of: dict[str, list[AbstractSlot]] = defaultdict(list)
        self._backends: dict[tuple[str, str], AbstractBackend] = {}
        self._polled: set[str] = set()  # semaphores with a slot polling a Python backend

    # -- building ----------------------------------------------------------------------

    def _default_gate(self, name: str, limit: int, lease_s: float) -> Gate:
        client = self.context.get("redis_c")
        if not isinstance(client, redis.Redis):
            raise ConfigurationError(
                "Scheduler needs a redis-py client in its context: Scheduler({'redis_c': "
                "redis.Redis(...)})"
            )
        return Gate(client, Scripts(client), name, limit, lease_s, prefix=self.prefix)

    def load(self, configs: Iterable[Mapping[str, Any]]) -> Scheduler:
        """Validate ``configs`` as a whole, then add their slots; returns the scheduler.

        Raises:
            ConfigurationError: see :func:`parse_slot_configs`; also a ``slot_id`` or a
                semaphore that an earlier ``load`` already defined.
        """
        parsed = parse_slot_configs(list(configs))
        known_ids = {slot.slot_id for slot in self.slots}
        for cfg in parsed:
            if cfg.slot_id in known_ids:
                raise ConfigurationError(f"slot_id {cfg.slot_id!r} is already loaded")
        by_semaphore: dict[str, list[SlotConfig]] = defaultdict(list)
        for cfg in parsed:
            by_semaphore[cfg.semaphore].append(cfg)
        for name in by_semaphore:
            if name in self._gates:
                raise ConfigurationError(
                    f"the slots of semaphore {name!r} are already defined; give all of them in "
                    "one list"
                )
        for name, cfgs in by_semaphore.items():
            self._add_semaphore(name, cfgs)
        return self

    def add_semaphore(self, name: str, limit: int, lease_s: float) -> Gate:
        """Add a semaphore of ``limit`` slots serving only gated calls (what ``@gated`` uses).

        Its slots live in Redis alone: the scripts hand them over, nothing here polls them,
        so no slot object is built per unit of the limit.
        """
        gate = self._gate_factory(name, limit, lease_s)
        self._gates[name] = gate
        self._backend_instance(name, gate, GatedCalls)
        return gate

    def _add_semaphore(self, name: str, cfgs: list[SlotConfig]) -> Gate:
        # Slots that serve parked calls first take numbers 1..k: the scripts hand a freed
        # slot among those to the next parked call without leaving Redis.
        ordered = sorted(cfgs, key=lambda c: not c.serves_gated_calls_first)
        k = sum(1 for c in ordered if c.serves_gated_calls_first)
        gate = self._gate_factory(name, k, max(c.timeout_s for c in ordered))
        self._gates[name] = gate
        for number, cfg in enumerate(ordered, start=1):
            backends = [self._backend_instance(name, gate, cls) for cls in cfg.backends]
            slot = cfg.slot_cls(gate, str(number), cfg.slot_id, backends, cfg.timeout_s)
            if any(not isinstance(b, GatedCalls) for b in backends) or number > k:
                self._polled.add(name)
            self.slots.append(slot)
            self._slots_of[name].append(slot)
        return gate

    def _backend_instance(
        self, name: str, gate: Gate, cls: type[AbstractBackend]
    ) -> AbstractBackend:
        key = (name, cls.__name__)
        if key not in self._backends:
            self._backends[key] = cls({**self.context, "gate": gate, "scheduler": self})
        return self._backends[key]

    # -- lookups -----------------------------------------------------------------------

    def gate(self, name: str) -> Gate | None:
        """The Gate of semaphore ``name``, or ``None`` when it has no slots here."""
        return self._gates.get(name)

    @property
    def gates(self) -> dict[str, Gate]:
        """Semaphore name -> Gate."""
        return dict(self._gates)

    def backend(self, semaphore: str, name: str) -> AbstractBackend | None:
        """The backend instance ``name`` of ``semaphore`` (``""`` means GatedCalls)."""
        return self._backends.get((semaphore, name or GatedCalls.__name__))

    # -- the three operations ------------------------------------------------------------

    def schedule(self) -> dict[str, dict[str, int]]:
        """Visit every slot: stop timed-out tasks, then start work in idle slots.

        Returns ``{semaphore: {"timed_out": n, "started": n}}``. Two schedulers running at
        once never start two tasks in one slot: every claim is one script.
        """
        summary: dict[str, dict[str, int]] = {}
        for name, gate in list(self._gates.items()):
            reclaimed, grants, malformed, dropped = gate.reclaim()
            timed_out = 0
            for r in reclaimed:
                if r.state == "parked":
                    logger.warning(
                        "semaphore %r: call %s was handed a slot but never started; parked again",
                        name,
                        r.task_id,
                    )
                    continue
                timed_out += 1
                logger.warning(
                    "semaphore %r: the task %s in slot %s timed out (state %s, runner %s); "
                    "its worker died or stopped renewing its lease",
                    name,
                    r.task_id,
                    r.slot or "?",
                    r.state,
                    r.runner or "-",
                )
                backend = self.backend(name, r.backend)
                if backend is not None:
                    _call(backend, "timeout_callback", r.task_id)
                    _call(backend, "stop_callback", r.task_id)
            gated_calls = self.backend(name, "")
            if isinstance(gated_calls, GatedCalls):
                # Nothing brought these back and no result arrived: give them a final state.
                for task_id, runner in dropped:
                    _call(gated_calls, "record_dropped", task_id, runner)
            started = self._publish(name, grants, malformed)
            if name in self._polled:
                started += self._fill(name, gate)
            summary[name] = {"timed_out": timed_out, "started": started}
        return summary

    def keepalive(self, task_id: str, *, semaphore: str | None = None) -> bool:
        """Keep the slot running ``task_id`` alive; returns whether a slot runs it."""
        return any(not self.renew(name, [task_id]) for name, _ in self._candidates(semaphore))

    def renew(self, semaphore: str, task_ids: list[str]) -> list[str]:
        """Renew the leases of ``task_ids`` in ``semaphore``; returns those that lost theirs.

        The backends that started any of them get their ``keepalive_callback``.
        """
        lost, backends = self._gates[semaphore].keepalive(task_ids)
        self.notify_keepalive(semaphore, backends)
        return lost

    def notify_keepalive(self, semaphore: str, backends: Mapping[str, str]) -> None:
        """Call ``keepalive_callback`` for ``{task id: backend name}`` of ``semaphore``."""
        for task_id, name in backends.items():
            backend = self.backend(semaphore, name)
            if backend is not None:
                _call(backend, "keepalive_callback", task_id)

    def stop(self, task_id: str, *, semaphore: str | None = None, fence: int | None = None) -> bool:
        """Free the slot running ``task_id`` so another task may start in it.

        Returns whether a slot was freed. Stopping twice, or a task whose slot was already
        reclaimed, changes nothing.
        """
        for name, gate in self._candidates(semaphore):
            outcome = gate.release(task_id, fence)
            self._publish(name, outcome.grants, outcome.malformed)
            if outcome.released:
                backend = self.backend(name, outcome.backend)
                if backend is not None:
                    _call(backend, "stop_callback", task_id)
                if name in self._polled:
                    self._fill(name, gate)
                return True
        return False

    # -- internals ---------------------------------------------------------------------

    def _candidates(self, semaphore: str | None) -> list[tuple[str, Gate]]:
        if semaphore is None:
            return list(self._gates.items())
        gate = self._gates.get(semaphore)
        return [(semaphore, gate)] if gate is not None else []

    def _publish(self, name: str, grants: list[Grant], malformed: list[Malformed]) -> int:
        for entry in malformed:
            logger.error(
                "semaphore %r: moved out a malformed parked entry %s: %r",
                name,
                entry.task_id,
                entry.raw[:200],
            )
        if not grants:
            return 0
        ext = self.context.get("extension")
        if ext is None:
            logger.error(
                "semaphore %r: %d parked calls but no Celery app to send them", name, len(grants)
            )
            return 0
        return int(ext.dispatch(name, grants))

    def _fill(self, name: str, gate: Gate) -> int:
        occupied = gate.slots()
        started = 0
        for slot in self._slots_of[name]:
            if slot.number not in occupied and self._visit(slot):
                started += 1
        return started

    def _visit(self, slot: AbstractSlot) -> bool:
        """Poll an idle slot's backends in order and start the first task any returns."""
        for backend in slot.backends:
            if isinstance(backend, GatedCalls) and int(slot.number) <= slot.gate.limit:
                continue  # the release and reclaim scripts already served these slots
            try:
                found = backend.poll()
            except Exception:
                logger.exception(
                    "backend %s of semaphore %r: poll() failed; skipped this time",
                    backend.name,
                    slot.gate.name,
                )
                continue
            if found is None:
                continue
            task_id = str(found)
            outcome, fence = slot.claim(task_id, backend)
            if outcome in (Claimed.SLOT_BUSY, Claimed.RECOVERING):
                return False  # another scheduler filled it; the task stays with its backend
            if outcome is Claimed.ALREADY_HELD:
                continue
            try:
                launched = backend.start_callback(task_id)
                if launched is not None and hasattr(launched, "apply_async"):
                    self._send(slot, task_id, launched)
            except Exception:
                logger.exception(
                    "backend %s of semaphore %r: start_callback(%s) failed; the slot is free again",
                    backend.name,
                    slot.gate.name,
                    task_id,
                )
                outcome_release = slot.gate.release(task_id, fence)
                self._publish(slot.gate.name, outcome_release.grants, outcome_release.malformed)
                return False
            return True
        return False

    def _send(self, slot: AbstractSlot, task_id: str, signature: Any) -> None:
        from .signals import HEADER

        # The header makes the worker's signal handlers keep the slot alive and free it at
        # the end of the run, whether or not the task is @gated itself.
        signature.apply_async(task_id=task_id, headers={HEADER: slot.gate.name})


def _call(backend: AbstractBackend, method: str, task_id: str, *args: Any) -> None:
    # A callback that raises is logged with its backend's name; the scheduler carries on.
    try:
        getattr(backend, method)(task_id, *args)
    except Exception:
        logger.exception("backend %s: %s(%s) raised", backend.name, method, task_id)
