"""What a page asked to see, and that part of the snapshot: a sorted, filtered page of gates
and the details of one gate. Built from memory only (see :mod:`.board`); bounded whatever the
number of gates or parked calls."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

from .board import PAGE, Board, Snapshot

__all__ = ["MAX_PARKED_OFFSET", "SORTS", "View"]

#: How deep the parked pages go (a page reads offset + PAGE calls per lane of the gate).
MAX_PARKED_OFFSET = 10_000
MAX_ROWS = 200


def _use(s: dict[str, Any]) -> float:
    limit = s["limit"]
    return s["held"] / limit if limit and limit > 0 else float(s["held"] > 0)


def _counter(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda s: s["counters"].get(name, 0)


#: The columns a page may sort the gates by.
SORTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "name": lambda s: s["gate"].casefold(),
    "use": _use,
    "held": lambda s: s["held"],
    "limit": lambda s: s["limit"] if s["limit"] is not None else -2,
    "parked": lambda s: s["parked"],
    "waiting": lambda s: s["waiting_time"] + s["waiting_requirements"],
    "oldest": lambda s: s["oldest_parked_s"] if s["oldest_parked_s"] is not None else -1.0,
    "paused": lambda s: s["paused"],
    **{name: _counter(name) for name in ("granted", "released", "reclaimed", "cancelled")},
}


def _int(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(query.get(name, default))
    except ValueError:
        value = default
    return min(max(value, low), high)


@dataclasses.dataclass(frozen=True)
class View:
    """A page's view: sort, filter and page of the gate list; the gate it opened, if any."""

    sort: str = "name"
    descending: bool = False
    needle: str = ""
    offset: int = 0
    count: int = PAGE
    gate: str | None = None
    parked_offset: int = 0

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> View:
        """Read a view from query parameters, clamped to what may be asked."""
        sort = query.get("sort", "name")
        parked_offset = _int(query, "parked", 0, 0, MAX_PARKED_OFFSET)
        return cls(
            sort=sort if sort in SORTS else "name",
            descending=query.get("order") == "desc",
            needle=query.get("filter", "")[:200].casefold(),
            offset=_int(query, "offset", 0, 0, 10**9),
            count=_int(query, "count", PAGE, 1, MAX_ROWS),
            gate=query.get("gate") or None,
            parked_offset=parked_offset - parked_offset % PAGE,
        )

    def gates(self, snapshot: Snapshot) -> dict[str, Any]:
        """The page of gates asked for: ``total`` known, ``matched`` by the filter, ``rows``."""
        found = [s for s in snapshot.gates.values() if self.needle in s["gate"].casefold()]
        found.sort(key=lambda s: s["gate"])
        found.sort(key=SORTS[self.sort], reverse=self.descending)
        offset = min(self.offset, max(0, len(found) - 1) // self.count * self.count)
        rows = [
            {k: v for k, v in s.items() if k != "busiest_keys"}
            for s in found[offset : offset + self.count]
        ]
        return {"total": len(snapshot.gates), "matched": len(found), "offset": offset, "rows": rows}

    def detail(self, board: Board, snapshot: Snapshot) -> dict[str, Any] | None:
        """The opened gate: status, holders, a page of parked calls, its charts' samples;
        ``None`` when no gate is opened, ``{"gate": name, "missing": True}`` when it is gone."""
        if self.gate is None:
            return None
        status = snapshot.gates.get(self.gate)
        if status is None:
            return {"gate": self.gate, "missing": True}
        found = snapshot.details.get((self.gate, self.parked_offset))
        out: dict[str, Any] = {
            "gate": self.gate,
            "missing": False,
            "status": status,
            "loading": found is None,
            "parked_offset": self.parked_offset,
            "parked_page": PAGE,
            "parked_max_offset": MAX_PARKED_OFFSET,
            "series": board.history.series(self.gate, time.monotonic()),
        }
        if found is not None:
            out.update(
                holders=found.holders, holders_total=found.holders_total, parked=found.parked
            )
        return out

    def message(self, board: Board, snapshot: Snapshot) -> dict[str, Any]:
        """Everything a page shows, as one JSON-ready dict."""
        if self.gate is not None:
            board.want(self.gate, self.parked_offset)
        return {
            "version": snapshot.version,
            "read_at": snapshot.read_at,
            "error": snapshot.error,
            "gates": self.gates(snapshot),
            "detail": self.detail(board, snapshot),
        }
