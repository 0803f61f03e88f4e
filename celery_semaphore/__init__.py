"""celery_semaphore: at most N of these at once, across every Celery worker.

Importing this package changes nothing; :func:`gated` and :func:`install` do.
"""

from __future__ import annotations

from .backends import AbstractBackend, GatedCalls, TaskBackend
from .decorator import GateSpec, gated
from .errors import (
    CallDropped,
    ConfigurationError,
    LeaseLost,
    RedisUnavailable,
    ScriptError,
    SemaphoreError,
)
from .extension import TICK_TASK, Extension, cancel, extension_for, install
from .gate import Acquired, Gate, Started
from .scheduler import Scheduler
from .signals import current_fence, holds_slot
from .slot import AbstractSlot, RedisSlot

__version__ = "0.1.0"

__all__ = [
    # decorating and installing
    "gated",
    "install",
    "cancel",
    "extension_for",
    "current_fence",
    "holds_slot",
    "Extension",
    "GateSpec",
    "TICK_TASK",
    # the scheduler model
    "Scheduler",
    "AbstractBackend",
    "AbstractSlot",
    "RedisSlot",
    "GatedCalls",
    "TaskBackend",
    # the semaphore itself
    "Gate",
    "Acquired",
    "Started",
    # errors
    "SemaphoreError",
    "ConfigurationError",
    "RedisUnavailable",
    "LeaseLost",
    "CallDropped",
    "ScriptError",
    "__version__",
]
