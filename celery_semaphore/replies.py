"""Reading a script's reply: grants to publish, and the follow-ups tagged beside them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .outcome import Due, Ended, Grant, Malformed, Notice, Reply, Trace
from .views import text

__all__ = ["TAG_DUE", "TAG_END", "TAG_NOTE", "TAG_TRACE", "split_grants"]

#: Tags of the follow-up rows of a script's reply (see lua/common.lua, FOLLOW).
TAG_TRACE, TAG_END, TAG_NOTE, TAG_DUE = "\x1et", "\x1eend", "\x1enote", "\x1edue"


def split_grants(rows: Iterable[Any]) -> tuple[list[Reply], list[Malformed]]:
    """The grants (and follow-ups) of reply rows, and the entries that could not be read."""
    grants: list[Reply] = []
    malformed: list[Malformed] = []
    for row in rows:
        head = text(row[0])
        if head == TAG_TRACE:
            grants.append(Trace(*(text(x) for x in row[1:6])))
        elif head == TAG_END:
            i, state, task, cause_id, cause_task, cause_text = (text(x) for x in row[1:7])
            grants.append(
                Ended(i, state, task, cause_id, cause_task, cause_text, row[7], bool(int(row[8])))
            )
        elif head == TAG_DUE:
            grants.append(Due(int(row[1])))
        elif head == TAG_NOTE:
            grants.append(Notice(*(text(x) for x in row[1:9])))
        elif int(row[1]) < 0:
            malformed.append(Malformed(head, row[2]))
        else:
            inputs = text(row[3]) if len(row) > 3 else ""
            grants.append(Grant(head, int(row[1]), row[2], inputs, len(row) > 4 and row[4] == 1))
    return grants, malformed
