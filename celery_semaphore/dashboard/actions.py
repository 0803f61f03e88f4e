"""What the dashboard's buttons do: resize, pause, resume, cancel and purge a gate, through the
admin API (each one script, journalled with this process's host and pid).

The handler checks the token before anything here runs; this module checks the request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery.utils.log import get_logger

from ..group import Group
from ..operations import GateOperations
from ..runtime import Runtime

__all__ = ["VERBS", "Refused", "perform"]

logger = get_logger(__name__)

#: The actions, by the last part of their path (``POST /api/action/<verb>``); ``check`` only
#: tells the page whether its token is the right one.
VERBS = ("check", "resize", "pause", "resume", "cancel", "purge")


class Refused(Exception):
    """The request cannot be done: an HTTP status and a message for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Gate(GateOperations):
    """A gate in the group the snapshot found it in (even a group this app does not name)."""

    def __init__(self, runtime: Runtime, name: str, group: str) -> None:
        self.runtime = runtime
        self.name = name
        self._group = runtime.group(group)

    @property
    def group(self) -> Group:
        """The group the gate lives in."""
        return self._group


def _text(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value) > 1000:
        raise Refused(400, f"{name} must be a non-empty string")
    return value


def perform(runtime: Runtime, groups: Mapping[str, str], verb: str, body: Mapping[str, Any]) -> str:
    """Do ``verb`` to the gate named in ``body`` (``groups``: gate -> group, as last read).

    Returns:
        What was done, in words.

    Raises:
        Refused: an unknown verb or gate, or a bad argument.
    """
    if verb not in VERBS:
        raise Refused(404, f"no action {verb!r}; the actions are {', '.join(VERBS)}")
    if verb == "check":
        return "the token is right: actions are on"
    name = _text(body, "gate")
    if name not in groups:
        raise Refused(404, f"no gate {name!r} is known")
    gate = _Gate(runtime, name, groups[name])
    if verb == "resize":
        limit, key = body.get("limit"), body.get("key") or None
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= 10**9:
            raise Refused(400, "limit must be a whole number of units")
        if key is not None and not isinstance(key, str):
            raise Refused(400, "key must be a string")
        if limit == 0 and key is None:
            raise Refused(400, "a gate's limit is at least 1 (0 is for a key: its default)")
        old = gate.resize(limit, key=key)
        done = f"key {key!r} of gate {name!r} resized to {limit or 'its default'}"
        if key is None:
            done = f"gate {name!r} resized from {old} to {limit}"
    elif verb == "pause":
        gate.pause()
        done = f"gate {name!r} paused: parked calls stay parked"
    elif verb == "resume":
        gate.resume()
        done = f"gate {name!r} resumed"
    elif verb == "cancel":
        task_id = _text(body, "task_id")
        state = gate.cancel(task_id)
        if not state:
            raise Refused(404, f"gate {name!r} knows no call {task_id!r} that can be cancelled")
        done = f"call {task_id!r} of gate {name!r} cancelled while {state}"
    else:
        if body.get("confirm") != name:
            raise Refused(400, "a purge must be confirmed: send confirm set to the gate's name")
        done = f"gate {name!r} purged: {gate.purge()} parked calls cancelled"
    logger.info("dashboard: %s", done)
    return done
