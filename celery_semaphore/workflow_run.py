"""A sent :class:`~celery_semaphore.Workflow`: its nodes' results, and waiting for them all."""

from __future__ import annotations

import time
from typing import Any, Generic, TypeVar

from celery import states
from celery.result import AsyncResult

__all__ = ["WorkflowRun"]

N = TypeVar("N")


class WorkflowRun(Generic[N]):
    """A sent workflow: ``results`` maps each node to its AsyncResult."""

    def __init__(self, workflow: Any, results: dict[N, AsyncResult]) -> None:
        self.workflow = workflow
        self.results = results

    def get(self, timeout: float | None = None, propagate: bool = True) -> dict[N, Any]:
        """Wait for every node; raise the first failure (in the order nodes were added) when
        ``propagate``, else return each node's result or exception."""
        deadline = None if timeout is None else time.monotonic() + timeout
        values: dict[N, Any] = {}
        for node, result in self.results.items():
            left = None if deadline is None else max(0.01, deadline - time.monotonic())
            values[node] = result.get(timeout=left, propagate=False, disable_sync_subtasks=False)
        if propagate:
            for result in self.results.values():
                if result.state in states.PROPAGATE_STATES:
                    result.maybe_throw()
        return values
