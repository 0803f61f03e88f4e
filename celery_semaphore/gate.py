"""A semaphore held in Redis: key names and every state change through one Lua script.

No Celery import here: a :class:`Gate` knows call ids, slots, leases and opaque messages, so
the Celery layer, the :class:`~celery_semaphore.Scheduler` and the tests drive the same object.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import redis

from .errors import RedisUnavailable
from .scripts import Scripts, code_of

__all__ = [
    "Acquired",
    "Started",
    "Claimed",
    "Grant",
    "Release",
    "Reclaimed",
    "Malformed",
    "Gate",
    "keys_for",
    "DEFAULT_DEDUPE_WINDOW_S",
    "DEFAULT_DROPPED_AFTER_S",
    "Reclaim",
]

#: How long a call that was delivered more than once is remembered after its end.
DEFAULT_DEDUPE_WINDOW_S = 3600.0
#: How long after its lease expired a running call is reported dropped if no result came.
DEFAULT_DROPPED_AFTER_S = 60.0


class Acquired(enum.IntEnum):
    """What :meth:`Gate.acquire` did with a call."""

    PARKED = 0
    GRANTED = 1
    HELD = 2  # the call already held a slot (a retry): it keeps it
    ALREADY_PARKED = 3
    BACKED_UP = 4  # a refused second execution, kept until the running one ends or dies
    DROPPED = 5  # a backup of a call that already ended


class Started(enum.IntEnum):
    """What :meth:`Gate.start` decided about a run that is about to begin."""

    RUN = 1
    DUPLICATE = 4  # the same call runs elsewhere right now
    REPARKED = 5  # the call's grant expired and it waits in the queue again
    REGRANTED = 6  # the call had lost its slot and took a free one
    LOST = 7  # the call holds no slot and none is free
    ENDED = 8  # the call already ran to its end: a late copy

    @property
    def runs(self) -> bool:
        """Whether the run may go ahead."""
        return self in (Started.RUN, Started.REGRANTED)


class Claimed(enum.IntEnum):
    """What :meth:`Gate.claim` did."""

    CLAIMED = 1
    SLOT_BUSY = 9
    ALREADY_HELD = 10
    RECOVERING = 11


@dataclasses.dataclass(frozen=True)
class Grant:
    """A parked call that was just handed a slot; its message must now be published."""

    task_id: str
    fence: int
    message: bytes


@dataclasses.dataclass(frozen=True)
class Malformed:
    """A parked entry that could not be published (no readable record or message)."""

    task_id: str
    raw: bytes


@dataclasses.dataclass(frozen=True)
class Release:
    """The outcome of :meth:`Gate.release`."""

    released: bool
    backend: str  # the backend that started the call ("" for a gated call)
    slot: str  # the slot it held ("" when nothing was released)
    grants: list[Grant]
    malformed: list[Malformed]


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
    backend: str
    slot: str
    redeliver: bool = False  # the broker will bring the call back (acks_late)


class Reclaim(NamedTuple):
    """The outcome of :meth:`Gate.reclaim`."""

    reclaimed: list[Reclaimed]
    grants: list[Grant]
    malformed: list[Malformed]
    #: (call id, last runner) of running calls whose lease expired ``dropped_after_s`` ago
    #: with no redelivery coming: nothing will finish them unless their result arrived.
    dropped: list[tuple[str, str]]


#: The keys of one semaphore, in the order the scripts receive them (see lua/common.lua).
KEY_PARTS = (
    "state", "holders", "meta", "queue", "calls", "slots", "ended", "aside", "suspect", "free",
)  # fmt: skip


def keys_for(prefix: str, name: str) -> tuple[str, ...]:
    """Return the Redis keys of semaphore ``name``; they share one hash tag for Redis Cluster."""
    tag = f"{{{prefix}:{name}}}"
    return tuple(f"{tag}:{part}" for part in KEY_PARTS)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Gate:
    """One semaphore: slots held as leases in Redis.

    Slots ``1..limit`` serve gated calls (a freed one is handed to the next parked call in
    the same step); a :class:`~celery_semaphore.Scheduler` may add slots numbered above.

    Args:
        client: a redis-py client (``decode_responses=False``).
        scripts: the scripts registered on ``client``.
        name: the semaphore's name.
        limit: number of slots that serve gated calls.
        lease_s: seconds a slot stays held without a keepalive.
        prefix: first part of every key.
        url: the Redis URL, named in errors.
        dedupe_window_s: how long a call delivered more than once is remembered after its end.
        dropped_after_s: how long after its lease expired a running call that nothing will
            redeliver is reported as dropped by :meth:`reclaim`.

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
        dedupe_window_s: float = DEFAULT_DEDUPE_WINDOW_S,
        dropped_after_s: float = DEFAULT_DROPPED_AFTER_S,
    ) -> None:
        self.client = client
        self.scripts = scripts
        self.name = name
        self.limit = limit
        self.lease_s = lease_s
        self.prefix = prefix
        self.url = url
        self.dedupe_window_s = dedupe_window_s
        self.dropped_after_s = dropped_after_s
        self.keys = keys_for(prefix, name)
        #: The data set this gate last saw (see common.lua); a change means Redis lost data.
        self.epoch = ""
        self._recover_ms = int(lease_s * 1000)
        # Whether the last acquire parked: then the next one sends its message up front.
        self._expect_full = False

    def __repr__(self) -> str:
        return f"<Gate {self.name!r} limit={self.limit} lease={self.lease_s}s>"

    def _run(self, script: Any, now_ms: int | None, args: Sequence[Any]) -> Any:
        head = ["" if now_ms is None else str(int(now_ms)), self.epoch, self._recover_ms]
        try:
            reply = script(keys=self.keys, args=[*head, *args])
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RedisUnavailable(self.url, exc) from exc
        self.epoch = _text(reply[0])
        return reply

    def _lease_ms(self, lease_s: float | None) -> int:
        lease_ms = int((self.lease_s if lease_s is None else lease_s) * 1000)
        # Recovery after lost data must outlast the longest lease this gate has handed out.
        self._recover_ms = max(self._recover_ms, lease_ms)
        return lease_ms

    def acquire(
        self,
        task_id: str,
        message: bytes | Callable[[], bytes],
        *,
        delay_ms: int = 0,
        lease_s: float | None = None,
        backup: bool = False,
        now_ms: int | None = None,
    ) -> tuple[Acquired, int]:
        """Take a slot for ``task_id`` if one is free and no call waits, else park it.

        ``message`` (bytes, or a function that encodes them) is stored only when the call is
        parked. While the gate had free slots the last time, the message is not encoded or
        sent up front; should the call have to park after all, the script writes nothing and
        asks for it, costing one more round trip then. ``delay_ms`` (a countdown) delays the
        start of the lease; ``backup`` marks a copy refused as a second live execution (see
        acquire.lua). Returns the outcome and the fence (granted, held) or the number of
        parked calls (parked).
        """
        encode = message if callable(message) else (lambda: message)
        lease_ms = self._lease_ms(lease_s)

        def send(payload: bytes) -> tuple[int, Any]:
            args = [task_id, self.limit, lease_ms, int(delay_ms), payload, int(backup)]
            reply = self._run(self.scripts.acquire, now_ms, args)
            return code_of("acquire", reply, (0, 1, 2, 3, 4, 5, 6)), reply

        eager = backup or not callable(message) or self._expect_full
        code, reply = send(encode() if eager else b"")
        if code == 6:  # it has to park after all: send it again with its message
            code, reply = send(encode())
        self._expect_full = code in (Acquired.PARKED, Acquired.ALREADY_PARKED)
        return Acquired(code), int(reply[2])

    def start(
        self,
        task_id: str,
        runner: str,
        *,
        redeliver: bool = False,
        lease_s: float | None = None,
        now_ms: int | None = None,
    ) -> tuple[Started, int, str]:
        """Mark ``task_id`` running under ``runner``.

        ``redeliver`` says the broker brings the call back if its worker dies (``acks_late``),
        so an expired lease of it is not a dropped call.

        Returns the verdict, the fence, and the name of the backend that started the call
        (``""`` for a gated call).
        """
        reply = self._run(
            self.scripts.start,
            now_ms,
            [task_id, self.limit, self._lease_ms(lease_s), runner, int(redeliver)],
        )
        verdict = Started(code_of("start", reply, (1, 4, 5, 6, 7, 8)))
        return verdict, int(reply[2]), _text(reply[3])

    def release(
        self, task_id: str, fence: int | None = None, *, now_ms: int | None = None
    ) -> Release:
        """Free the slot of ``task_id`` (of grant ``fence`` if given) and hand off free slots."""
        fence_arg = "" if fence is None else str(int(fence))
        window_ms = int(self.dedupe_window_s * 1000)
        reply = self._run(self.scripts.release, now_ms, [task_id, fence_arg, self.limit, window_ms])
        grants, malformed = _split_grants(reply[4:])
        return Release(bool(int(reply[1])), _text(reply[2]), _text(reply[3]), grants, malformed)

    def keepalive(
        self, task_ids: Iterable[str], *, now_ms: int | None = None
    ) -> tuple[list[str], dict[str, str]]:
        """Renew the leases of ``task_ids``.

        Returns the ids that hold no slot any more, and ``{id: backend}`` of the renewed ones
        that a scheduler backend started.
        """
        ids = list(task_ids)
        if not ids:
            return [], {}
        reply = self._run(self.scripts.keepalive, now_ms, [self.limit, self._lease_ms(None), *ids])
        kept = reply[2]
        backends = {_text(kept[i]): _text(kept[i + 1]) for i in range(0, len(kept), 2)}
        return [_text(x) for x in reply[1]], backends

    def reclaim(self, *, batch: int = 1000, now_ms: int | None = None) -> Reclaim:
        """Take back expired leases, then hand free slots to parked calls."""
        grace_ms = int(self.dropped_after_s * 1000)
        reply = self._run(self.scripts.reclaim, now_ms, [self.limit, int(batch), grace_ms])
        reclaimed = [
            Reclaimed(_text(i), _text(s), _text(w), int(f), _text(b), _text(n), bool(int(a)))
            for i, s, w, f, b, n, a in reply[1]
        ]
        grants, malformed = _split_grants(reply[2])
        dropped = [tuple(_text(x).split(" ", 1)) for x in reply[3]]
        return Reclaim(reclaimed, grants, malformed, [(d[0], d[-1]) for d in dropped])

    def claim(
        self,
        slot: int | str,
        task_id: str,
        backend: str,
        *,
        lease_s: float | None = None,
        now_ms: int | None = None,
    ) -> tuple[Claimed, int, bytes]:
        """Give slot ``slot`` to ``task_id``, a call that backend ``backend`` handed over.

        Returns the outcome, the fence, and the parked message when the call was a parked
        gated call (else ``b""``).
        """
        reply = self._run(
            self.scripts.claim, now_ms, [str(slot), task_id, self._lease_ms(lease_s), backend]
        )
        outcome = Claimed(code_of("claim", reply, (1, 9, 10, 11)))
        message = reply[3] if isinstance(reply[3], bytes) else str(reply[3]).encode()
        return outcome, int(reply[2]), message

    def cancel(self, task_id: str) -> bool:
        """Remove ``task_id`` from the queue if it is parked; returns whether it was."""
        return bool(int(self._run(self.scripts.cancel, None, [task_id])[1]))

    # Read-only views, for status displays, schedulers and tests.

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

    def slots(self) -> dict[str, str]:
        """Slot number -> call id of every held slot."""
        return {
            _text(k): _text(v) for k, v in self._call(self.client.hgetall, self.keys[5]).items()
        }

    def set_aside(self, task_id: str, raw: bytes) -> None:
        """Keep an unpublishable entry for an operator (the caller then releases the call)."""
        self._call(self.client.hset, self.keys[7], task_id, raw)

    def aside(self) -> dict[str, bytes]:
        """Call id -> raw entry of the parked entries that were moved aside as unreadable."""
        return {_text(k): v for k, v in self._call(self.client.hgetall, self.keys[7]).items()}

    def holds(self, task_id: str, fence: int | None = None) -> bool:
        """Whether ``task_id`` holds a slot now (under grant ``fence``, if given)."""
        raw = self._call(self.client.hget, self.keys[2], task_id)
        if raw is None:
            return False
        try:
            record = json.loads(raw)
        except ValueError:
            return False
        return record.get("s") in ("g", "r") and (fence is None or record.get("f") == fence)

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
