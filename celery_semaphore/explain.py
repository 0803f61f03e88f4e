"""``explain(task_id)``: one call's story, the answer to "why is my task not running?"."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

from celery import Celery

from .admin import SEP, now_ms, text
from .errors import SemaphoreError
from .extension import install
from .listing import parked
from .requires import locate

__all__ = ["Event", "Explanation", "UnknownCall", "explain"]

#: How far down the release order ``explain`` looks for a parked call's position.
POSITION_SCAN = 1000


class UnknownCall(SemaphoreError, LookupError):
    """No gate knows the call (never gated, or ended longer than semaphore_history_ttl ago)."""

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id

    def __str__(self) -> str:
        return (
            f"no gate knows call {self.task_id}: it was not gated, or it ended longer than "
            "semaphore_history_ttl ago"
        )


@dataclasses.dataclass(frozen=True)
class Event:
    """One transition of a call (Redis time)."""

    at: datetime
    state: str
    event: str


@dataclasses.dataclass(frozen=True)
class Explanation:
    """A call's state, history and what it waits for."""

    task_id: str
    task: str
    group: str
    gates: tuple[str, ...]
    #: WAITING, PARKED, DISPATCHED, RUNNING, RETRYING, or a final state.
    state: str
    final: bool
    events: tuple[Event, ...]
    #: What it waits for now (or how it ended), in words.
    reason: str
    #: Its place in the release order when parked (1 = next), None otherwise or too far.
    position: int | None
    #: Its Celery result state (PENDING when no result backend).
    result_state: str

    def __str__(self) -> str:
        lines = [f"{self.task}[{self.task_id}] {self.state} in gate {','.join(self.gates)}"]
        lines.append(f"  {self.reason}")
        if self.position is not None:
            lines.append(f"  position {self.position} in the release order")
        previous = "NEW"
        for e in self.events:
            stamp = f"{e.at:%Y-%m-%d %H:%M:%S.%f}"[:-3]
            lines.append(f"  {stamp}  {previous}->{e.event}->{e.state}")
            previous = e.state
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``celery semaphore explain --json``)."""
        out = dataclasses.asdict(self)
        out["events"] = [
            {"at": e.at.isoformat(), "state": e.state, "event": e.event} for e in self.events
        ]
        return out


def _when(ms: Any) -> datetime:
    return datetime.fromtimestamp(int(ms) / 1000.0, tz=UTC)


def explain(task_id: str, app: Celery) -> Explanation:
    """Tell one call's story: its state and history, its gate, its place in the release order,
    what it waits for (a full or paused gate, its start time, a requirement, a full key), or
    how and when it ended.

    Raises:
        UnknownCall: no gate knows it.
    """
    rt = install(app)
    name = locate(rt, task_id)
    if name is None:
        raise UnknownCall(task_id)
    group = rt.group(name)
    record = group.history(task_id)
    if record is None:  # only its id is remembered (cancelled or run twice, no history kept)
        record = {"state": "ENDED", "gates": [], "events": []}
    state = str(record.get("status") or record.get("state") or "")
    gates = tuple(str(g) for g in record.get("gates") or ())
    final = "status" not in record  # a live record has its public status beside its state
    events = tuple(Event(_when(ms), str(s), str(e)) for ms, s, e in record.get("events") or ())
    position = None
    now = now_ms(group)
    internal = record.get("state")
    if final:
        reason = f"ended {state}"
        if record.get("end_ms"):
            reason += f" at {_when(record['end_ms']):%Y-%m-%d %H:%M:%S} UTC"
        if record.get("error"):
            reason += f": {record['error']}"
        elif record.get("reason"):
            reason += f" ({record['reason']})"
    elif internal == "needs":
        met = record.get("met") or {}
        left = [r for r in record.get("needs") or () if r not in met]
        reason = f"waits for its requirements: {', '.join(left)}"
    elif internal == "waiting":
        left_s = (int(record.get("ready_ms") or now) - now) / 1000.0
        reason = f"waits for its start time, in {max(0.0, left_s):.1f} s"
    elif internal == "parked":
        reason, position = _parked_reason(group, gates, task_id, record)
        if record.get("ahead"):  # semaphore_prefetch
            holder = record.get("holder")
            reason += (
                f"; sent ahead of its grant, held by {holder}"
                if holder
                else "; sent ahead of its grant, in the broker"
            )
    elif internal == "granted":
        reason = "handed room and sent to the broker; no worker has started it yet"
    else:
        runner = record.get("runner") or "?"
        reason = f"runs on {runner}, fence {record.get('fence')}"
        if record.get("unconfirmed"):
            reason += " (granted to its holder, which has not confirmed the run yet)"
    return Explanation(
        task_id=task_id,
        task=str(record.get("task") or ""),
        group=name,
        gates=gates,
        state=state,
        final=final,
        events=events,
        reason=reason,
        position=position,
        result_state=str(app.AsyncResult(task_id).state),
    )


def _parked_reason(
    group: Any, gates: tuple[str, ...], task_id: str, record: dict[str, Any]
) -> tuple[str, int | None]:
    lane = group.client.hget(group.keys["lanes"], record.get("lane") or "")
    info = json.loads(lane) if lane else {}
    first = gates[0] if gates else ""
    position = next(
        (p.position for p in parked(group, first, 0, POSITION_SCAN) if p.task_id == task_id), None
    )
    if info.get("wait") == "key":
        gate, key, *_ = [*str(info.get("member", "")).split(SEP), "", ""]
        return f"parked: key {key!r} of gate {gate} is at its limit", position
    gate = str(info.get("gate") or first)
    limit, used, paused = group.client.hmget(
        group.keys["state"], f"{gate}:limit", f"{gate}:used", f"{gate}:paused"
    )
    if text(paused or "") == "1":
        return f"parked: gate {gate} is paused", position
    return (
        f"parked: gate {gate} is full ({text(used or 0)} of {text(limit or '?')} units held)",
        position,
    )
