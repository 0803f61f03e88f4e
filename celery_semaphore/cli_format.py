"""How ``celery semaphore`` shows things to a person: aligned tables, durations, colour.

Colour is used only when the stream is a terminal and Celery's ``--no-color`` is off; cells
are padded before they are styled, so escape codes never break the alignment.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import click
from celery.platforms import EX_UNAVAILABLE

from .admin import COUNTERS, GateStatus
from .listing import Holder, ParkedCall

__all__ = [
    "EXIT_FAILED",
    "EXIT_UNAVAILABLE",
    "EXIT_UNKNOWN",
    "EXIT_USAGE",
    "Cell",
    "CommandError",
    "cancel_text",
    "duration",
    "holders_text",
    "jsonable",
    "log_to_stderr",
    "parked_text",
    "resize_text",
    "status_text",
    "table",
    "wants_colour",
]

#: Exit statuses: not done; bad usage (click's own); unknown gate or task id; no Redis
#: (Celery's own status when its broker is unreachable).
EXIT_FAILED, EXIT_USAGE, EXIT_UNKNOWN, EXIT_UNAVAILABLE = 1, 2, 3, EX_UNAVAILABLE

#: A cell: its text, or (text, click.style keyword arguments).
Cell = str | tuple[str, dict[str, Any]]

GATE_HEADERS = ("GATE", "HELD/LIMIT", "PARKED", "WAITING", "OLDEST", "PAUSED", "COUNTERS")
HOLDER_HEADERS = ("TASK ID", "TASK", "KEY", "STATE", "WORKER", "PID", "HELD", "LEASE", "FENCE")
PARKED_HEADERS = ("#", "TASK ID", "TASK", "PRIORITY", "KEY", "AGE", "WAITS FOR")
#: The state a cancelled call was in (cancel.lua's names), as explain and results name it.
PUBLIC_STATE = {"waiting": "WAITING", "needs": "WAITING", "parked": "PARKED",
                "granted": "DISPATCHED", "running": "RUNNING"}  # fmt: skip
#: The counters a status row sums up, in this order (the others are in ``--json``).
SUMMARY = ("granted", *COUNTERS)


class CommandError(click.ClickException):
    """What went wrong and what to do, for stderr, with the exit status it ends with."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        colour = wants_colour(sys.stderr)
        head = click.style("Error:", fg="red", bold=True) if colour else "Error:"
        click.echo(f"{head} {self.message}", err=True, color=colour)


class _Brief(logging.Formatter):
    """One line per record: an operator needs the error, not the traceback."""

    def formatException(self, ei: Any) -> str:
        return f"  ({ei[1]})"


def log_to_stderr() -> None:
    """Show the package's warnings on stderr (a library, it logs to a NullHandler): a call
    handed room that could not be sent to the broker, say."""
    logger = logging.getLogger("celery_semaphore")
    if not any(isinstance(h.formatter, _Brief) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Brief("%(levelname)s: %(message)s"))
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)


def wants_colour(stream: TextIO, no_color: bool = False) -> bool:
    """Whether to colour what goes to ``stream``: a terminal, and ``--no-color`` not given."""
    isatty = getattr(stream, "isatty", None)
    return not no_color and callable(isatty) and bool(isatty())


def duration(seconds: float | None) -> str:
    """``seconds`` for a person: ``0.4s``, ``12s``, ``3m05s``, ``2h03m``; ``-`` for None."""
    if seconds is None:
        return "-"
    sign, s = ("-" if seconds < 0 else ""), abs(seconds)
    if s < 10:
        return f"{sign}{s:.1f}s"
    if s < 60:
        return f"{sign}{int(s)}s"
    if s < 3600:
        return f"{sign}{int(s // 60)}m{int(s % 60):02d}s"
    return f"{sign}{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def table(
    headers: Sequence[str], rows: Sequence[Sequence[Cell]], colour: bool, right: Sequence[int] = ()
) -> str:
    """Rows under their headers, columns aligned (those in ``right`` to the right)."""
    plain = [[c if isinstance(c, str) else c[0] for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in plain)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[Cell]) -> str:
        out = []
        for i, cell in enumerate(cells):
            text, style = (cell, {}) if isinstance(cell, str) else cell
            padded = text.rjust(widths[i]) if i in right else text.ljust(widths[i])
            out.append(click.style(padded, **style) if colour and style else padded)
        return "  ".join(out).rstrip()

    return "\n".join([line([(h, {"bold": True}) for h in headers]), *map(line, rows)])


def _limit(limit: int | None) -> str:
    return "-" if limit is None else "keys" if limit < 0 else str(limit)


def _waiting(status: GateStatus) -> str:
    parts = [f"{status.waiting_time} time"] if status.waiting_time else []
    parts += [f"{status.waiting_requirements} reqs"] if status.waiting_requirements else []
    return ", ".join(parts) or "0"


def _counters(counters: dict[str, int]) -> str:
    return " ".join(f"{name}={counters[name]}" for name in SUMMARY if counters.get(name))


def gate_rows(statuses: Sequence[GateStatus]) -> list[list[Cell]]:
    """One ``status`` row per gate (a full gate's count in red, a paused gate in yellow)."""
    rows: list[list[Cell]] = []
    for s in statuses:
        full = s.limit is not None and 0 < s.limit <= s.held
        held: Cell = (f"{s.held}/{_limit(s.limit)}", {"fg": "red"} if full else {})
        paused: Cell = ("yes", {"fg": "yellow", "bold": True}) if s.paused else "no"
        rows.append(
            [s.gate, held, str(s.parked), _waiting(s), duration(s.oldest_parked_s), paused,
             _counters(s.counters) or "-"]
        )  # fmt: skip
    return rows


def holder_rows(holders: Sequence[Holder]) -> list[list[Cell]]:
    """One ``holders`` row per holding call (a lease about to run out in red)."""
    return [
        [h.task_id, h.task, h.key or "-", h.state, h.worker or "-",
         "-" if h.pid is None else str(h.pid), duration(h.held_s),
         (duration(h.lease_left_s), {"fg": "red"} if h.lease_left_s < 1 else {}), str(h.fence)]
        for h in holders
    ]  # fmt: skip


def parked_rows(calls: Sequence[ParkedCall]) -> list[list[Cell]]:
    """One ``parked`` row per waiting call, in release order."""
    return [
        [str(p.position), p.task_id, p.task, str(p.priority), p.key or "-", duration(p.age_s),
         p.waits_for]
        for p in calls
    ]  # fmt: skip


def jsonable(items: Sequence[Any]) -> list[dict[str, Any]]:
    """Dataclasses as JSON-ready dicts."""
    return [dataclasses.asdict(item) for item in items]


def status_text(found: Sequence[GateStatus], colour: bool, url: str) -> str:
    """The ``status`` table, one row per gate."""
    if not found:
        return f"no gates known to this app or to its Redis at {url}"
    return table(GATE_HEADERS, gate_rows(found), colour, right=(2,))


def watch_frame(text: str, interval: float, tty: bool) -> str:
    """One refresh of ``status --watch``: drawn over the last on a terminal, else appended."""
    if not tty:
        return f"{text}\n"
    clock = f"{time.strftime('%H:%M:%S')}  every {interval:g}s; Ctrl-C stops"
    return f"\x1b[H\x1b[2J{text}\n{clock}"


def holders_text(gate: str, found: Sequence[Holder], colour: bool) -> str:
    """The ``holders`` table."""
    if not found:
        return f"no call holds gate {gate}"
    return table(HOLDER_HEADERS, holder_rows(found), colour, right=(5, 6, 7, 8))


def parked_text(
    gate: str, found: Sequence[ParkedCall], colour: bool, offset: int, count: int
) -> str:
    """A page of the ``parked`` table, with the option that shows the next page."""
    if not found:
        return f"no call of gate {gate} is parked" + (f" past {offset}" if offset else "")
    text = table(PARKED_HEADERS, parked_rows(found), colour, right=(0, 3))
    more = f"\n(more may follow: --offset {offset + count})" if len(found) == count else ""
    return text + more


def resize_text(gate: str, limit: int, key: str | None, old: int | None) -> str:
    """What ``resize`` did."""
    if key is not None:
        return f"gate {gate}, key {key!r}: limit -> {limit or 'the configured one'}"
    return f"gate {gate}: limit {'-' if old is None else old} -> {limit}"


def cancel_text(task_id: str, gate: str, was: str, action: str) -> str:
    """What ``cancel`` did (``action`` as in its ``--json``)."""
    if action == "cancelled":
        return (
            f"cancelled call {task_id} ({was} in gate {gate}): it will not run; its result is "
            "REVOKED"
        )
    how = "revoked with terminate" if action == "terminated" else "revoked with Celery"
    return f"call {task_id} runs: {how}; its room comes back at its end"
