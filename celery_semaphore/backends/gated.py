"""``GatedCalls``: the parked calls of ``@gated`` tasks, as one backend of the slot model."""

from __future__ import annotations

from typing import Any

from .base import AbstractBackend

__all__ = ["GatedCalls"]


class GatedCalls(AbstractBackend):
    """The parked ``@gated`` calls of a semaphore, served by the scripts themselves.

    A slot list may name it (it documents that the semaphore's gate also serves gated calls),
    but there is nothing to poll: whenever the gate has room, the script that freed it hands
    that room to the best parked call in the same atomic step, before any slot polls.
    """

    def poll(self) -> str | None:
        """Always ``None``: parked calls never wait for a poll."""
        return None

    def start_callback(self, task_id: str) -> Any:
        """Never called (``poll`` returns nothing)."""
        return None
