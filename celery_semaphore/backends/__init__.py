"""Backends: where a scheduler's slots find work (see :class:`AbstractBackend`)."""

from __future__ import annotations

from .base import AbstractBackend, resolve_backend
from .gated import GatedCalls
from .tasks import TaskBackend

__all__ = ["AbstractBackend", "GatedCalls", "TaskBackend", "resolve_backend"]
