"""Slots: the unit of concurrency a :class:`~celery_semaphore.Scheduler` fills with tasks."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, ClassVar

from .backends.base import AbstractBackend
from .group import Claimed, Group

__all__ = ["AbstractSlot", "RedisSlot"]


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
