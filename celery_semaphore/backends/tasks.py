"""``TaskBackend``: a backend whose tasks run as Celery tasks on workers."""

from __future__ import annotations

from typing import Any, ClassVar

from .base import AbstractBackend

__all__ = ["TaskBackend"]


class TaskBackend(AbstractBackend):
    """Maps each polled id to a named Celery task, run on a worker with the id as argument.

    Set :attr:`task_name` (or override :meth:`signature`), override :meth:`poll`, and
    :meth:`mark_started` if the store needs to record that the task was taken. The slot sends
    the signature under the polled id; the task's end (success, failure, revoke, lost
    worker) frees the slot through the worker's signal handlers, and ``stop_callback`` runs.
    The Scheduler's context must hold the Celery app as ``'app'``.
    """

    #: Name of the Celery task that runs a polled id.
    task_name: ClassVar[str] = ""

    def signature(self, task_id: str) -> Any:
        """The Celery signature that runs ``task_id``: ``task_name(task_id)`` by default."""
        if not self.task_name:
            raise NotImplementedError(f"{type(self).__name__} must set task_name or signature()")
        return self.context["app"].signature(self.task_name, args=(task_id,))

    def mark_started(self, task_id: str) -> None:
        """Record in the task store that ``task_id`` was taken (override when needed)."""

    def start_callback(self, task_id: str) -> Any:
        """Mark the task taken and return its signature, which the slot sends."""
        self.mark_started(task_id)
        return self.signature(task_id)
