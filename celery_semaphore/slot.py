"""Slots: the unit of concurrency a :class:`~celery_semaphore.Scheduler` fills with tasks,
and the validation of a slot configuration list."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, ClassVar

from .backends.base import AbstractBackend, resolve_backend, resolve_class
from .config import check_name, check_seconds
from .errors import ConfigurationError
from .group import Claimed, Group

__all__ = [
    "DEFAULT_SLOT_TIMEOUT_S",
    "AbstractSlot",
    "RedisSlot",
    "SlotConfig",
    "parse_slot_configs",
]

#: Seconds a slot's task may go without a keepalive before it is stopped.
DEFAULT_SLOT_TIMEOUT_S = 300.0
DEFAULT_SEMAPHORE = "slots"
_REQUIRED = ("backends", "slot_cls", "slot_id")
_ALLOWED = {*_REQUIRED, "timeout", "semaphore"}


class AbstractSlot:
    """One slot of a semaphore: at most one task runs in it at a time.

    A subclass is registered under its class name, so ``'slot_cls'`` can name it.

    Args:
        group: the Group the semaphore lives in.
        semaphore: the semaphore (gate) the slot belongs to.
        number: the slot's number within the semaphore.
        slot_id: the id given in the configuration.
        backends: where the slot looks for work, in order.
        timeout_s: seconds without a keepalive after which the slot's task is stopped.
    """

    registry: ClassVar[dict[str, type[AbstractSlot]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        AbstractSlot.registry[cls.__name__] = cls

    def __init__(
        self,
        group: Group,
        semaphore: str,
        number: str,
        slot_id: Hashable,
        backends: Sequence[AbstractBackend],
        timeout_s: float,
    ) -> None:
        self.group = group
        self.semaphore = semaphore
        self.number = number
        self.slot_id = slot_id
        self.backends = list(backends)
        self.timeout_s = timeout_s
        #: How many slots the semaphore has (the limit of its gate).
        self.size = 1

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.slot_id!r} of {self.semaphore!r} #{self.number}>"

    def current(self) -> str | None:
        """The id of the task running in this slot, or ``None`` when it is idle."""
        raise NotImplementedError

    def claim(self, task_id: str, backend: AbstractBackend) -> tuple[Claimed, int]:
        """Take ``task_id`` into this slot atomically; returns the outcome and the fence."""
        raise NotImplementedError


class RedisSlot(AbstractSlot):
    """A slot whose state lives in Redis, shared by every scheduler process."""

    def current(self) -> str | None:
        """The id of the task running in this slot, or ``None``."""
        return self.group.slots(self.semaphore).get(self.number)

    def claim(self, task_id: str, backend: AbstractBackend) -> tuple[Claimed, int]:
        """Claim the slot for ``task_id`` in one script: it fails when the slot is busy."""
        return self.group.claim(
            self.semaphore,
            self.number,
            task_id,
            backend.name,
            lease_ms=int(self.timeout_s * 1000),
            limit=self.size,
        )


@dataclasses.dataclass(frozen=True)
class SlotConfig:
    """One validated entry of a slot configuration list."""

    slot_id: Hashable
    backends: tuple[type[AbstractBackend], ...]
    slot_cls: type[AbstractSlot]
    timeout_s: float
    semaphore: str


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
                    f"{where}.timeout", entry.get("timeout", DEFAULT_SLOT_TIMEOUT_S), 1.0
                ),
                semaphore=check_name(
                    f"{where}.semaphore", entry.get("semaphore", DEFAULT_SEMAPHORE)
                ),
            )
        )
    return parsed
