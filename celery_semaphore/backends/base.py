"""The backend contract: the docstrings of :class:`AbstractBackend` are the contract."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, ClassVar

from ..errors import ConfigurationError

__all__ = ["AbstractBackend", "resolve_backend", "resolve_class"]


class AbstractBackend:
    """A source of tasks for a :class:`~celery_semaphore.Scheduler`'s slots.

    Subclass it and override :meth:`poll` and :meth:`start_callback`; the other callbacks are
    optional. A subclass is registered under its class name when it is defined, so slot
    configurations can name it (``'backends': ['MyBackend']``); a dotted import path works too.

    One instance serves every slot of one semaphore; it is built as ``cls(context)``, where
    ``context`` is the mapping given to the Scheduler plus ``'gate'`` (the semaphore's name),
    ``'group'`` (the :class:`~celery_semaphore.Group` it lives in) and ``'scheduler'``.

    Callbacks run in the scheduler's process (``schedule()``) or in a worker (``stop`` and
    ``keepalive`` from Celery's signals), so they must not rely on process-local state that
    only one of them has.
    """

    registry: ClassVar[dict[str, type[AbstractBackend]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        AbstractBackend.registry[cls.__name__] = cls

    def __init__(self, context: Mapping[str, Any]) -> None:
        self.context = context

    @property
    def name(self) -> str:
        """The name the backend is recorded under in Redis (its class name)."""
        return type(self).__name__

    def poll(self) -> str | None:
        """Return the unique id of a task to start, or ``None`` when there is nothing to do.

        It must not mark the task as taken: the slot may fail to claim it (another scheduler
        took the slot first), and then the same task must be returned again later. An id that
        ran to its end within ``semaphore_dedupe_window`` is never started again, even when
        two schedulers polled it at once; after that window a backend must not return it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement poll()")

    def start_callback(self, task_id: str) -> Any:
        """Mark the task as taken, then launch it; must not block.

        Must be overridden. It may return a Celery signature: the slot then sends it under
        ``task_id``, so the task runs on a worker and its end frees the slot. If it raises,
        the slot is freed again and no other callback is called.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement start_callback()")

    def stop_callback(self, task_id: str) -> None:
        """The slot stopped working on the task: it finished, or it timed out."""

    def timeout_callback(self, task_id: str) -> None:
        """The task timed out (no keepalive within the slot's timeout); stop_callback follows."""

    def keepalive_callback(self, task_id: str) -> None:
        """A keepalive arrived for the task."""


def resolve_class(
    ref: object, registry: Mapping[str, type], base: type, what: str, setting: str
) -> type:
    """Turn a registered name, a dotted path or a class into a subclass of ``base``.

    Raises:
        ConfigurationError: the name is unknown or the class is not a ``base``.
    """
    if isinstance(ref, type):
        cls = ref
    elif isinstance(ref, str) and ref in registry:
        cls = registry[ref]
    elif isinstance(ref, str) and "." in ref:
        module, _, attr = ref.replace(":", ".").rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigurationError(f"{setting}: cannot import {what} {ref!r}: {exc}") from exc
    else:
        known = ", ".join(sorted(registry)) or "none"
        raise ConfigurationError(
            f"{setting}: unknown {what} {ref!r}; known names: {known} (or give a dotted path)"
        )
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigurationError(f"{setting}: {ref!r} is not a subclass of {base.__name__}")
    return cls


def resolve_backend(ref: object, setting: str = "backends") -> type[AbstractBackend]:
    """Resolve a backend reference and check that it overrides ``poll`` and ``start_callback``."""
    cls = resolve_class(ref, AbstractBackend.registry, AbstractBackend, "backend", setting)
    for method in ("start_callback", "poll"):
        if getattr(cls, method) is getattr(AbstractBackend, method):
            raise ConfigurationError(
                f"{setting}: backend {cls.__name__} does not override {method}(), "
                "which every backend must implement"
            )
    return cls
