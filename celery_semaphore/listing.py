"""Who holds a gate and who waits for it, in release order (read-only, bounded reads)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .admin import SEP, now_ms, text
from .group import Group

__all__ = ["Holder", "ParkedCall", "holders", "parked"]


@dataclasses.dataclass(frozen=True)
class Holder:
    """A call holding units of a gate."""

    task_id: str
    task: str
    key: str
    state: str  # DISPATCHED (sent, not started) or RUNNING
    worker: str
    pid: int | None
    held_s: float
    lease_left_s: float
    fence: int


@dataclasses.dataclass(frozen=True)
class ParkedCall:
    """A call waiting for room, in release order."""

    position: int  # 1 = the next to be handed room
    task_id: str
    task: str
    priority: int
    key: str
    age_s: float
    #: Where its lane waits: "gate <name>" (no room) or "key <name>/<key>" (its key is full).
    waits_for: str


def _records(group: Group, ids: list[str]) -> list[dict[str, Any]]:
    raw = group.client.hmget(group.keys["calls"], ids) if ids else []
    out = []
    for item in raw:
        try:
            out.append(json.loads(item) if item else {})
        except ValueError:
            out.append({})
    return out


def _key_of(record: dict[str, Any], gate: str) -> str:
    gates, keys = record.get("gates") or [], record.get("keys") or []
    return str(keys[gates.index(gate)]) if gate in gates and gates.index(gate) < len(keys) else ""


def holders(group: Group, gate: str) -> list[Holder]:
    """The calls holding units of ``gate``: who runs them, for how long, lease left, fence."""
    now = now_ms(group)
    pairs: list[Any] = group.client.zrange(group.keys["holders"], 0, -1, withscores=True)
    ids = [text(k) for k, _ in pairs]
    out = []
    for (_, deadline), task_id, record in zip(pairs, ids, _records(group, ids), strict=True):
        if gate not in (record.get("gates") or [gate]):
            continue
        runner = str(record.get("runner") or "")
        host, _, pid = runner.rpartition(":")
        out.append(
            Holder(
                task_id=task_id,
                task=str(record.get("task") or ""),
                key=_key_of(record, gate),
                state=str(record.get("status") or ""),
                worker=host or runner,
                pid=int(pid) if pid.isdigit() else None,
                held_s=(now - int(record.get("granted_ms") or now)) / 1000.0,
                lease_left_s=(int(deadline) - now) / 1000.0,
                fence=int(record.get("fence") or 0),
            )
        )
    return out


def parked(group: Group, gate: str, offset: int = 0, count: int = 50) -> list[ParkedCall]:
    """The calls waiting for room of ``gate``, in release order: lanes by priority, round
    robin between the lanes of one priority, first in first out within a lane (lanes whose key
    is full come last). Reads at most ``offset + count`` calls per lane."""
    want = offset + count
    now = now_ms(group)
    lanes = {text(k): json.loads(v) for k, v in group.client.hgetall(group.keys["lanes"]).items()}
    ranked = []
    for lane, info in lanes.items():
        gates = lane.split(SEP, 1)[0].split(",")
        if gate not in gates:
            continue
        blocked = info.get("wait") == "key"
        ranked.append((blocked, -int(info.get("priority", 0)), int(info.get("turn", 0)), lane))
    ranked.sort()
    members: dict[str, list[str]] = {}
    pipe = group.client.pipeline(transaction=False)
    for *_, lane in ranked:
        pipe.zrangebylex(group.keys["queue"], f"[{lane}{SEP}", f"[{lane}{SEP}\xff", 0, want)
    for (*_, lane), found in zip(ranked, pipe.execute(), strict=True):
        members[lane] = [text(m).rsplit(SEP, 1)[-1] for m in found]
    order: list[tuple[str, str]] = []
    groups: dict[tuple[bool, int], list[str]] = {}
    for blocked, priority, _, lane in ranked:
        groups.setdefault((blocked, priority), []).append(lane)
    for _, same in sorted(groups.items()):
        depth = 0
        while len(order) < want and any(depth < len(members[lane]) for lane in same):
            order.extend(
                (lane, members[lane][depth]) for lane in same if depth < len(members[lane])
            )
            depth += 1
    page = order[offset:want]
    records = _records(group, [task_id for _, task_id in page])
    out = []
    for n, ((lane, task_id), record) in enumerate(zip(page, records, strict=True)):
        info = lanes[lane]
        waits = f"gate {info.get('gate') or gate}"
        if info.get("wait") == "key":
            where = str(info.get("member", "")).split(SEP)
            waits = f"key {where[0]}/{where[1] if len(where) > 1 else ''}"
        out.append(
            ParkedCall(
                position=offset + n + 1,
                task_id=task_id,
                task=str(record.get("task") or ""),
                priority=int(record.get("priority") or 0),
                key=_key_of(record, gate),
                age_s=(now - int(record.get("parked_ms") or now)) / 1000.0,
                waits_for=waits,
            )
        )
    return out
