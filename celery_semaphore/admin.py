"""The admin API: what a gate holds, who waits and why, and the operations on it.

Reads are a few pipelined commands (never a scan of the backlog); every change is one script
(see lua/operate.lua, resize.lua, cancel.lua), safe beside running calls and a tick, and
journalled with who did it. :class:`~celery_semaphore.Semaphore` and ``celery semaphore``
are thin layers over these functions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from typing import Any

from .group import Group
from .runtime import Runtime
from .views import text

__all__ = [
    "BUCKETS_S",
    "COUNTERS",
    "SEP",
    "GateStatus",
    "Histogram",
    "Metrics",
    "Operation",
    "journal",
    "known_gates",
    "metrics",
    "now_ms",
    "operator",
    "status",
    "text",
]

#: Upper bounds (seconds) of the wait and hold histograms' buckets (lua/common.lua), +Inf last.
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
#: The counters every gate keeps.
COUNTERS = (
    "dispatched", "released", "reclaimed", "parked", "rejected", "expired", "dropped",
    "cancelled", "replaced",
)  # fmt: skip
#: Separator of fields in Redis records and lanes.
SEP = "\x1f"


def operator() -> str:
    """Who operates, as journalled: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclasses.dataclass(frozen=True)
class Histogram:
    """A Prometheus-style histogram: cumulative counts per upper bound (seconds)."""

    #: (upper bound in seconds, calls at or below it), ending with (inf, count).
    buckets: tuple[tuple[float, int], ...]
    sum_s: float
    count: int


@dataclasses.dataclass(frozen=True)
class Metrics:
    """A gate's counters and histograms since its group was created."""

    gate: str
    #: granted (the wait histogram's count), dispatched (handed room from the queue), released,
    #: reclaimed, parked, rejected, expired, dropped, cancelled, replaced.
    counters: dict[str, int]
    #: How long calls waited for room (0 for those granted at once).
    wait: Histogram
    #: How long calls held their units.
    hold: Histogram


@dataclasses.dataclass(frozen=True)
class GateStatus:
    """One gate now."""

    gate: str
    group: str
    #: The limit in force (None until a call named the gate; -1: per-key limits only).
    limit: int | None
    #: Units held (weights counted), and the most ever held at once.
    held: int
    peak: int
    #: Calls holding the group's gates, waiting for room, for a start time, for requirements.
    holders: int
    parked: int
    waiting_time: int
    waiting_requirements: int
    #: Seconds the oldest parked call has waited (None when none is parked).
    oldest_parked_s: float | None
    paused: bool
    #: (key, units held) of the busiest keys, at most ten.
    busiest_keys: tuple[tuple[str, int], ...]
    counters: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``--json`` shape of ``celery semaphore status``)."""
        out = dataclasses.asdict(self)
        out["busiest_keys"] = [list(k) for k in self.busiest_keys]
        return out


@dataclasses.dataclass(frozen=True)
class Operation:
    """One journalled operation on a group's gates."""

    at_ms: int
    who: str
    what: str


def now_ms(group: Group) -> int:
    """Redis TIME in ms, the one clock."""
    sec, usec = group.client.time()
    return int(sec) * 1000 + int(usec) // 1000


def _histogram(state: dict[str, str], prefix: str) -> Histogram:
    counts = [int(state.get(f"{prefix}{i}", 0)) for i in range(1, len(BUCKETS_S) + 2)]
    running, buckets = 0, []
    for le, n in zip((*BUCKETS_S, float("inf")), counts, strict=True):
        running += n
        buckets.append((float(le), running))
    return Histogram(tuple(buckets), int(state.get(f"{prefix}sum", 0)) / 1000.0, running)


def metrics(group: Group, gate: str) -> Metrics:
    """The counters and histograms of ``gate`` (kept in its group's state hash)."""
    state = {text(k): text(v) for k, v in group.client.hgetall(group.keys["state"]).items()}
    head = f"m{SEP}{gate}{SEP}"
    wait = _histogram(state, f"{head}wait{SEP}")
    hold = _histogram(state, f"{head}hold{SEP}")
    counters = {name: int(state.get(head + name, 0)) for name in COUNTERS}
    counters["granted"] = wait.count
    return Metrics(gate, counters, wait, hold)


def status(group: Group, gate: str) -> GateStatus:
    """``gate`` now: limit, held, parked, waiting, oldest parked, paused, keys, counters."""
    keys = group.keys
    pipe = group.client.pipeline(transaction=False)
    pipe.hmget(keys["state"], f"{gate}:limit", f"{gate}:used", f"{gate}:peak", f"{gate}:paused")
    pipe.hget(keys["state"], "needs")
    pipe.zcard(keys["holders"])
    pipe.zcard(keys["queue"])
    pipe.zcard(keys["delayed"])
    pipe.zrange(keys["since"], 0, 0, withscores=True)
    pipe.hgetall(keys["usage"])
    pipe.time()
    (limit, used, peak, paused), needs, held, queued, delayed, oldest, usage, now = pipe.execute()
    now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
    head = f"{gate}{SEP}"
    per_key = sorted(
        ((text(k)[len(head) :], int(v)) for k, v in usage.items() if text(k).startswith(head)),
        key=lambda kv: -kv[1],
    )[:10]
    return GateStatus(
        gate=gate,
        group=group.name,
        limit=int(limit) if limit is not None else None,
        held=int(used or 0),
        peak=int(peak or 0),
        holders=int(held),
        parked=int(queued),
        waiting_time=int(delayed),
        waiting_requirements=max(0, int(needs or 0)),
        oldest_parked_s=(now_ms - oldest[0][1]) / 1000.0 if oldest else None,
        paused=text(paused or "") == "1",
        busiest_keys=tuple(per_key),
        counters=metrics(group, gate).counters,
    )


def journal(group: Group, count: int = 20) -> list[Operation]:
    """The last operations on the group's gates, newest first."""
    out = []
    for raw in group.client.lrange(group.keys["journal"], 0, count - 1):
        doc = json.loads(raw)
        out.append(Operation(int(doc["ms"]), str(doc["who"]), str(doc["what"])))
    return out


def known_gates(rt: Runtime) -> dict[str, str]:
    """Every gate the app and Redis know: gate -> its group."""
    found: dict[str, str] = {}
    for gates in rt.task_gates():
        for name in gates.names:
            found[name] = gates.group
    for name in rt.settings.limits:
        found.setdefault(name, rt.settings.groups.get(name, name))
    for group in rt.known_groups():
        raw = rt.client.hget(rt.group(group).keys["state"], "gates")
        for name in text(raw or "").split(","):
            if name:
                found.setdefault(name, group)
    return dict(sorted(found.items()))
