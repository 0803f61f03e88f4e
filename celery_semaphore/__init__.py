"""celery_semaphore: at most N of these at once, across every Celery worker.

Importing this package changes nothing; :func:`gated` and :func:`install` do.
"""

from __future__ import annotations

from .decorator import GateSpec, gated
from .errors import ConfigurationError, LeaseLost, RedisUnavailable, ScriptError, SemaphoreError
from .extension import TICK_TASK, Extension, extension_for, install
from .gate import Acquired, Gate, Started
from .signals import current_fence

__version__ = "0.1.0"

__all__ = [
    # decorating and installing
    "gated",
    "install",
    "extension_for",
    "current_fence",
    "Extension",
    "GateSpec",
    "TICK_TASK",
    # the semaphore itself
    "Gate",
    "Acquired",
    "Started",
    # errors
    "SemaphoreError",
    "ConfigurationError",
    "RedisUnavailable",
    "LeaseLost",
    "ScriptError",
    "__version__",
]
