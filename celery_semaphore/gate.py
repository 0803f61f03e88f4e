"""A semaphore held in Redis: key names and every state change through one Lua script.

No Celery import here: a :class:`Gate` knows call ids, leases and opaque messages, so the
Celery layer, the Scheduler and the tests all drive the same object.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from .errors import RedisUnavailable
from .scripts import Scripts, code_of

__all__ = ["Acquired", "Gate", "Grant", "Reclaimed", "Started", "keys_for"]


class Acquired(enum.IntEnum):
    """What :meth:`Gate.acquire` did with a call."""

    PARKED = 0
    GRANTED = 1
    HELD = 2  # the call already held a slot (a retry): it keeps it
    ALREADY_PARKED = 3


class Started(enum.IntEnum):
    """What :meth:`Gate.start` decided about a run that is about to begin."""

    RUN = 1
    DUPLICATE = 4  # the same call runs elsewhere right now
    REPARKED = 5  # the call's grant expired and it waits in the queue again
    REGRANTED = 6  # the call had lost its slot and took a free one
    LOST = 7  # the call holds no slot and none is free

    @property
    def runs(self) -> bool:
        """Whether the run may go ahead."""
        return self in (Started.RUN, Started.REGRANTED)


@dataclasses.dataclass(frozen=True)
class Grant:
    """A parked call that was just handed a slot; its message must now be published."""

    task_id: str
    fence: int
    message: bytes


@dataclasses.dataclass(frozen=True)
class Reclaimed:
    """A lease that expired and was taken back by :meth:`Gate.reclaim`.

    ``state`` is the call's state when it expired: ``"r"`` running (its worker died or
    stalled), ``"g"`` granted but never started, ``"parked"`` handed back to the queue,
    ``"malformed"`` an unreadable record.
    """

    task_id: str
    state: str
    runner: str
    fence: int


@dataclasses.dataclass(frozen=True)
class Malformed:
    """A parked entry that could not be published (no readable record or message)."""

    task_id: str
    raw: bytes


def keys_for(prefix: str, name: str) -> tuple[str, str, str, str, str]:
    """Return the Redis keys of semaphore ``name``; they share one hash tag for Redis Cluster."""
    tag = f"{{{prefix}:{name}}}"
    return (f"{tag}:state", f"{tag}:holders", f"{tag}:meta", f"{tag}:queue", f"{tag}:calls")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _now_arg(now_ms: int | None) -> str:
    return "" if now_ms is None else str(int(now_ms))


class Gate:
    """One semaphore: ``limit`` slots held as leases in Redis.

    Args:
        client: a redis-py client (``decode_responses=False``).
        scripts: the scripts registered on ``client``.
        name: the semaphore's name.
        limit: number of slots.
        lease_s: seconds a slot stays held without a keepalive.
        prefix: first part of every key.
        url: the Redis URL, named in errors.

    Every method takes an optional ``now_ms`` so tests can drive the clock; by default the
    scripts read Redis ``TIME``.
    """

    def __init__(
        self,
        client: redis.Redis,
        scripts: Scripts,
        name: str,
        limit: int,
        lease_s: float,
        prefix: str = "semaphore",
        url: str = "redis",
    ) -> None:
        self.client = client
        self.scripts = scripts
        self.name = name
        self.limit = limit
        self.lease_s = lease_s
        self.prefix = prefix
        self.url = url
        self.keys = keys_for(prefix, name)

    def __repr__(self) -> str:
        return f"<Gate {self.name!r} limit={self.limit} lease={self.lease_s}s>"

    def _run(self, script: Any, args: Sequence[Any]) -> Any:
        try:
            return script(keys=self.keys, args=args)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RedisUnavailable(self.url, exc) from exc

    def _lease_ms(self, lease_s: float | None) -> int:
        return int((self.lease_s if lease_s is None else lease_s) * 1000)

    def acquire(
        self,
        task_id: str,
        message: bytes,
        *,
        delay_ms: int = 0,
        lease_s: float | None = None,
        now_ms: int | None = None,
    ) -> tuple[Acquired, int]:
        """Take a slot for ``task_id`` if one is free and no call waits, else park it.

        ``message`` is stored only when the call is parked; ``delay_ms`` (a countdown) delays
        the start of the lease. Returns the outcome and the
        fence (granted, held) or the number of parked calls (parked).
        """
        reply = self._run(
            self.scripts.acquire,
            [
                _now_arg(now_ms),
                task_id,
                self.limit,
                self._lease_ms(lease_s),
                int(delay_ms),
                message,
            ],
        )
        return Acquired(code_of("acquire", reply, (0, 1, 2, 3))), int(reply[1])

    def start(
        self, task_id: str, runner: str, *, lease_s: float | None = None, now_ms: int | None = None
    ) -> tuple[Started, int]:
        """Mark ``task_id`` running under ``runner``; returns the verdict and the fence."""
        reply = self._run(
            self.scripts.start,
            [_now_arg(now_ms), task_id, self.limit, self._lease_ms(lease_s), runner],
        )
        return Started(code_of("start", reply, (1, 4, 5, 6, 7))), int(reply[1])

    def release(
        self, task_id: str, fence: int | None = None, *, now_ms: int | None = None
    ) -> tuple[bool, list[Grant], list[Malformed]]:
        """Free the slot of ``task_id`` (of grant ``fence`` if given) and hand off free slots.

        Returns whether a slot was freed, the calls handed a slot (to publish) and any
        malformed parked entries that were moved out of the queue.
        """
        fence_arg = "" if fence is None else str(int(fence))
        reply = self._run(self.scripts.release, [_now_arg(now_ms), task_id, fence_arg, self.limit])
        grants, malformed = _split_grants(reply[1:])
        return bool(int(reply[0])), grants, malformed

    def keepalive(self, task_ids: Iterable[str], *, now_ms: int | None = None) -> list[str]:
        """Renew the leases of ``task_ids``; returns those that hold no slot any more."""
        ids = list(task_ids)
        if not ids:
            return []
        reply = self._run(self.scripts.keepalive, [_now_arg(now_ms), *ids])
        return [_text(x) for x in reply]

    def reclaim(
        self, *, batch: int = 1000, now_ms: int | None = None
    ) -> tuple[list[Reclaimed], list[Grant], list[Malformed]]:
        """Take back expired leases, then hand free slots to parked calls."""
        reply = self._run(self.scripts.reclaim, [_now_arg(now_ms), self.limit, int(batch)])
        reclaimed = [Reclaimed(_text(i), _text(s), _text(w), int(f)) for i, s, w, f in reply[0]]
        grants, malformed = _split_grants(reply[1])
        return reclaimed, grants, malformed

    def cancel(self, task_id: str) -> bool:
        """Remove ``task_id`` from the queue if it is parked; returns whether it was."""
        return bool(self._run(self.scripts.cancel, [task_id]))

    # Read-only views, for status displays and tests.

    def held(self) -> int:
        """Number of slots held now (expired leases included until reclaimed)."""
        return int(self._call(self.client.zcard, self.keys[1]))

    def parked(self) -> int:
        """Number of calls waiting for a slot."""
        return int(self._call(self.client.zcard, self.keys[3]))

    def holders(self) -> dict[str, int]:
        """Call id -> lease deadline (ms) of every holder."""
        pairs = self._call(self.client.zrange, self.keys[1], 0, -1, withscores=True)
        return {_text(k): int(v) for k, v in pairs}

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RedisUnavailable(self.url, exc) from exc


def _split_grants(rows: Sequence[Any]) -> tuple[list[Grant], list[Malformed]]:
    grants: list[Grant] = []
    malformed: list[Malformed] = []
    for task_id, fence, payload in rows:
        if int(fence) < 0:
            malformed.append(Malformed(_text(task_id), payload))
        else:
            grants.append(Grant(_text(task_id), int(fence), payload))
    return grants, malformed
