"""What the scripts answer: outcome codes and records, decoded once (see :mod:`.group`)."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, NamedTuple

__all__ = [
    "Acquired",
    "Admission",
    "Claimed",
    "Due",
    "Ended",
    "Grant",
    "Notice",
    "Reply",
    "Trace",
    "Malformed",
    "Reclaim",
    "Reclaimed",
    "Release",
    "Started",
]


class Acquired(enum.IntEnum):
    """What :meth:`Group.acquire` did with a call."""

    PARKED = 0  # waits for room
    GRANTED = 1
    HELD = 2  # a re-send by the call's own run (retry, replace): it keeps its hold
    DUPLICATE = 3  # the id is already pending or held: nothing written
    BACKED_UP = 4  # a refused second execution, kept until the running one ends or dies
    DROPPED = 5  # a backup of a call that already ended
    WAITING = 7  # waits for its start time (countdown / ETA / a retry's countdown)
    REJECTED = 8  # max_pending reached, on_full="reject": nothing written
    FULL_DROPPED = 9  # max_pending reached, on_full="drop": nothing written, it ends GateFull
    RESENT = 10  # a second send of a call granted at its first send, not started: publish a copy
    NEEDS = 11  # waits for its requirements (the caller links them)
    PUSHED = 12  # granted, and its message pushed into the broker's queue (see push.py)


class Started(enum.IntEnum):
    """What :meth:`Group.start` decided about a run that is about to begin."""

    RUN = 1
    DUPLICATE = 4  # the same call runs elsewhere right now
    REPARKED = 5  # the call's grant expired and it waits again
    LOST = 7  # the call holds nothing: send it through the gate again
    ENDED = 8  # the call already ran to its end, or was cancelled: a late copy
    AHEAD = 9  # sent ahead of its grant (prefetch): hold it until a release grants it

    @property
    def runs(self) -> bool:
        """Whether the run may go ahead."""
        return self is Started.RUN


class Claimed(enum.IntEnum):
    """What :meth:`Group.claim` did."""

    CLAIMED = 1
    SLOT_BUSY = 9
    ALREADY_HELD = 10
    RECOVERING = 11
    ENDED = 12  # the id ran to its end recently: a backend polled it again


class Admission(NamedTuple):
    """The outcome of :meth:`Group.acquire`."""

    outcome: Acquired
    #: The fence (granted, held) or the number of calls waiting (parked, rejected, dropped).
    n: int
    #: The limits in force of the call's gates, as stored in Redis.
    limits: list[int]
    #: Calls handed room meanwhile (their start time came): to publish.
    grants: list[Reply]
    #: ``("over", pending)`` parked over max_pending; ``("replaced", id, message)`` the older
    #: parked call this one replaced; else ``()``.
    extra: tuple[Any, ...] = ()


@dataclasses.dataclass(frozen=True)
class Grant:
    """A waiting call that was just handed room; its message must now be published."""

    task_id: str
    fence: int
    message: bytes
    #: JSON list of the results it receives from its requirements ("" when none).
    inputs: str = ""
    #: The script put its message in the broker's queue itself (see push.py): nothing to do.
    pushed: bool = False


@dataclasses.dataclass(frozen=True)
class Trace:
    """A transition of a tracked call (``track=True``), to log in one line."""

    task_id: str
    task: str
    source: str
    event: str
    target: str


@dataclasses.dataclass(frozen=True)
class Ended:
    """A waiting call ended without running because a requirement failed or was cancelled."""

    task_id: str
    state: str  # FAILED or CANCELLED
    task: str
    cause_id: str
    cause_task: str
    cause_text: str
    message: bytes
    track: bool


@dataclasses.dataclass(frozen=True)
class Notice:
    """A requirement ended whose dependent lives in another group: tell that group."""

    tag: str  # the dependent's group as its hash tag
    dependent: str
    requirement: str
    state: str
    payload: str
    text: str
    task: str
    member: str  # its entry in the requirement's outbox, removed once acknowledged


@dataclasses.dataclass(frozen=True)
class Due:
    """The group has something due at ``ms`` (Redis time) earlier than the tick knew."""

    ms: int


#: What a script hands back beside its own answer: calls to publish and follow-ups.
Reply = Grant | Trace | Ended | Notice | Due


@dataclasses.dataclass(frozen=True)
class Malformed:
    """A waiting entry that could not be published (no readable record or message)."""

    task_id: str
    raw: bytes


@dataclasses.dataclass(frozen=True)
class Release:
    """The outcome of :meth:`Group.release`."""

    released: bool
    backend: str  # the backend that started the call ("" for a gated call)
    slot: str  # the scheduler slot it held ("")
    grants: list[Reply]
    malformed: list[Malformed]


@dataclasses.dataclass(frozen=True)
class Reclaimed:
    """A lease that expired and was taken back by :meth:`Group.reclaim`.

    ``state`` is ``"running"`` (its worker died or stalled), ``"granted"`` (handed room,
    never started, no message to send again), ``"waiting"`` (it will be sent again),
    ``"abandoned"`` (handed room ``dispatches`` times without starting: given up),
    ``"lock-expired"`` (a Semaphore hold whose waiting process never took it), or
    ``"malformed"``.
    """

    task_id: str
    state: str
    runner: str
    fence: int
    backend: str
    slot: str
    redeliver: bool = False  # the broker will bring the call back (acks_late)
    dispatches: int = 0
    message: bytes = b""  # an abandoned call's message (to name its queue)


class Reclaim(NamedTuple):
    """The outcome of :meth:`Group.reclaim`."""

    reclaimed: list[Reclaimed]
    grants: list[Reply]
    malformed: list[Malformed]
    #: (call id, last runner) of calls whose lease expired ``dropped_after_s`` ago with no
    #: redelivery coming: nothing will finish them unless their result arrived.
    dropped: list[tuple[str, str]]
    #: (call id, seconds waited, message, gate) of parked calls whose wait_timeout passed.
    expired: list[tuple[str, float, bytes, str]] = []
    #: When anything of the group is next due (ms, Redis time), None when nothing is.
    next_due: int | None = None
