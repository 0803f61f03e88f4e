"""The read-only views of a gate group, for status displays, schedulers and tests.

A mixin of :class:`~celery_semaphore.group.Group`: plain reads of the group's keys (see
lua/common.lua), never a script, never a write but :meth:`GroupViews.set_aside`.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from .errors import RedisUnavailable

__all__ = ["GroupViews", "text"]


def text(value: Any) -> str:
    """A Redis reply as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


class GroupViews:
    """What a group holds now (mixed into ``Group``, which sets these attributes)."""

    client: Any
    keys: dict[str, str]
    url: str

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RedisUnavailable(self.url, exc) from exc

    def limit(self, gate: str) -> int | None:
        """The limit in force of ``gate`` (``None`` while no call named it)."""
        raw = self._call(self.client.hget, self.keys["state"], f"{gate}:limit")
        return int(raw) if raw is not None else None

    def used(self, gate: str) -> int:
        """Units of ``gate`` held now (weights counted)."""
        return int(self._call(self.client.hget, self.keys["state"], f"{gate}:used") or 0)

    def key_usage(self) -> dict[tuple[str, str], int]:
        """``{(gate, key): units}`` of every key that holds units now."""
        raw = self._call(self.client.hgetall, self.keys["usage"])
        return {tuple(text(k).split("\x1f", 1)): int(v) for k, v in raw.items()}  # type: ignore[misc]

    def held(self) -> int:
        """Number of calls holding the group's gates (expired leases until reclaimed)."""
        return int(self._call(self.client.zcard, self.keys["holders"]))

    def parked(self) -> int:
        """Number of calls waiting for room."""
        return int(self._call(self.client.zcard, self.keys["queue"]))

    def waiting(self) -> int:
        """Number of calls waiting for their start time."""
        return int(self._call(self.client.zcard, self.keys["delayed"]))

    def holders(self) -> dict[str, int]:
        """Call id -> lease deadline (ms) of every holder."""
        pairs = self._call(self.client.zrange, self.keys["holders"], 0, -1, withscores=True)
        return {text(k): int(v) for k, v in pairs}

    def record(self, task_id: str) -> dict[str, Any] | None:
        """The stored record of a call (see lua/common.lua), or ``None``."""
        raw = self._call(self.client.hget, self.keys["calls"], task_id)
        try:
            return json.loads(raw) if raw is not None else None
        except ValueError:
            return None

    def slots(self, gate: str) -> dict[str, str]:
        """Scheduler slot number -> call id of every occupied slot of ``gate``."""
        raw = self._call(self.client.hgetall, self.keys["slots"])
        head = f"{gate}:"
        return {text(k)[len(head) :]: text(v) for k, v in raw.items() if text(k).startswith(head)}

    def aside(self) -> dict[str, bytes]:
        """Call id -> raw entry of entries moved aside as unreadable."""
        return {text(k): v for k, v in self._call(self.client.hgetall, self.keys["aside"]).items()}

    def set_aside(self, task_id: str, raw: bytes) -> None:
        """Keep an unpublishable entry for an operator (the caller then releases the call)."""
        self._call(self.client.hset, self.keys["aside"], task_id, raw)

    def holds(self, task_id: str, fence: int | None = None) -> bool:
        """Whether ``task_id`` holds its gates now (under grant ``fence``, if given)."""
        record = self.record(task_id)
        if record is None:
            return False
        return record.get("state") in ("granted", "running") and (
            fence is None or record.get("fence") == fence
        )

    def history(self, task_id: str) -> dict[str, Any] | None:
        """A call's story: its live record, or its history once it ended (kept for
        ``semaphore_history_ttl``); ``None`` when unknown here."""
        record = self.record(task_id)
        if record is not None:
            return record
        raw = self._call(self.client.hget, self.keys["history"], task_id)
        try:
            return json.loads(raw) if raw is not None else None
        except ValueError:
            return None
