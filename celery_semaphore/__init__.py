"""celery_semaphore: at most N of these at once, across every Celery worker.

Importing this package changes nothing; :func:`gated` and :func:`install` do.
"""

from __future__ import annotations

from .backends import AbstractBackend, GatedCalls, TaskBackend
from .decorator import gated
from .errors import (
    AcceptanceUnknown,
    AcquireTimeout,
    CallDropped,
    ConfigurationError,
    DuplicateCall,
    GateFull,
    LeaseLost,
    NeverStarted,
    RedisUnavailable,
    RequirementFailed,
    ScriptError,
    SemaphoreError,
    WaitTimeout,
    WorkflowError,
)
from .explain import Explanation, UnknownCall, explain
from .extension import cancel, install
from .graph import GraphvizMissing
from .group import Acquired, Group, Started
from .guard import current_fence, holds_slot, require_slot
from .operations import gates
from .recurring import Recurring, recurring
from .runtime import Runtime, runtime_for
from .scheduler import Scheduler
from .semaphore import Hold, Semaphore
from .slot import AbstractSlot, RedisSlot
from .spec import GateSpec
from .tick import TICK_TASK
from .workflow import Node, Workflow, WorkflowRun

__version__ = "0.2.0"

__all__ = [
    # decorating and installing
    "gated",
    "install",
    "cancel",
    "current_fence",
    "holds_slot",
    "require_slot",
    "Semaphore",
    "Hold",
    "recurring",
    "Recurring",
    "gates",
    "explain",
    "Explanation",
    "Workflow",
    "WorkflowRun",
    "Node",
    "runtime_for",
    "Runtime",
    "GateSpec",
    "TICK_TASK",
    # the scheduler model
    "Scheduler",
    "AbstractBackend",
    "AbstractSlot",
    "RedisSlot",
    "GatedCalls",
    "TaskBackend",
    # the gates in Redis
    "Group",
    "Acquired",
    "Started",
    # errors
    "SemaphoreError",
    "ConfigurationError",
    "RedisUnavailable",
    "AcceptanceUnknown",
    "DuplicateCall",
    "GateFull",
    "WaitTimeout",
    "AcquireTimeout",
    "LeaseLost",
    "CallDropped",
    "NeverStarted",
    "RequirementFailed",
    "WorkflowError",
    "GraphvizMissing",
    "UnknownCall",
    "ScriptError",
    "__version__",
]
