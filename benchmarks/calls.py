"""Calls made by hand at the :class:`~celery_semaphore.Group` level (no Celery involved).

The same record the publish path builds (:class:`~celery_semaphore.spec.CallSpec`), so a
benchmark that drives a group directly runs exactly the scripts a real call runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery_semaphore.group import Group
from celery_semaphore.spec import CallSpec

__all__ = ["acquire", "call_json"]


def call_json(
    gates: Sequence[str],
    *,
    keys: Sequence[str] | None = None,
    weights: Sequence[int] | None = None,
    key_limits: Sequence[int] | None = None,
    priority: int = 0,
    lease_s: float = 3600.0,
) -> str:
    """The JSON record acquire.lua stores for a call of ``gates``."""
    n = len(gates)
    spec = CallSpec(
        keys=tuple(keys or ("",) * n),
        weights=tuple(weights or (1,) * n),
        key_limits=tuple(key_limits or (0,) * n),
        priority=priority,
        lease_ms=int(lease_s * 1000),
        redeliver=False,
    )
    return spec.to_json(tuple(gates))


def acquire(
    group: Group,
    task_id: str,
    gates: Sequence[str],
    limits: Sequence[int],
    message: bytes = b"m",
    *,
    lease_s: float = 3600.0,
    **call: Any,
) -> Any:
    """Acquire ``gates`` for a call made by hand; returns what :meth:`Group.acquire` returns."""
    body = call_json(gates, lease_s=lease_s, **call)
    return group.acquire(task_id, body, list(limits), message, lease_ms=int(lease_s * 1000))
