"""Calls that require other calls: linking them in Redis, and what their ends bring about.

A call sent with requirements waits in its group's Redis, taking nothing (see
lua/common.lua). Each requirement lists it as a dependent in the requirement's own group; the
requirement's end counts it there in the same script when both share a group, else through a
notice this module carries to the dependent's group (one hop; the tick repeats a notice that
was not acknowledged). Follow-ups of every script reply pass through :func:`follow`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from celery import states
from celery.result import AsyncResult
from celery.utils.log import get_logger

from .errors import WorkflowError
from .runtime import Runtime
from .spec import UNLIMITED, GateSpec, TaskGates

__all__ = [
    "FREE_GATE",
    "NODE_OPTION",
    "ON_REQUIREMENT_FAILURE",
    "Needs",
    "free_gates",
    "link_requirements",
    "locate",
    "requirement_ids",
    "send_waiting",
    "take_requirements",
]

logger = get_logger(__name__)

#: The gate of workflow nodes whose task is not gated: no limit, but their ends are counted.
FREE_GATE = "semaphore.free"
#: What a call does when a requirement fails: end FAILURE (RequirementFailed) without
#: running, run with the exception in place of the result, or end REVOKED without running.
ON_REQUIREMENT_FAILURE = ("fail", "pass", "cancel")
#: The option a Workflow sends its nodes with (its requirements' ids and groups are known).
NODE_OPTION = "semaphore_node"


@dataclasses.dataclass(frozen=True)
class Needs:
    """What a call's requirement options ask for."""

    #: (requirement id, its group), in ``requires`` order.
    requirements: tuple[tuple[str, str], ...]
    #: Requirements may be sent after this call (a workflow's own nodes).
    future: bool
    #: Fields of the call's record (see lua/common.lua).
    fields: dict[str, Any]


def send_waiting(
    app: Any, name: str, args: Any, kwargs: Any, options: dict[str, Any]
) -> AsyncResult:
    """Send a call whose first argument comes from its requirements.

    Celery's argument check would see the call without that argument, so the call goes
    through ``app.send_task`` with the task's own options, as ``Task.apply_async`` would.
    """
    task = app.tasks.get(name)
    if task is not None:
        options = {**task._get_exec_options(), **options}
        options.setdefault("ignore_result", task.ignore_result)
        options.setdefault("result_cls", task.AsyncResult)
        options.setdefault("task_type", task)
    return app.send_task(name, args, kwargs, **options)


def free_gates(rt: Runtime, task: str) -> TaskGates:
    """The gates of a workflow node whose task is not gated: the unlimited free gate."""
    rt.register_group(FREE_GATE)
    return TaskGates(
        task=task,
        specs=(GateSpec(FREE_GATE),),
        names=(FREE_GATE,),
        group=FREE_GATE,
        limits=(UNLIMITED,),
        lease_s=rt.settings.lease_s,
    )


def take_requirements(rt: Runtime, options: dict[str, Any]) -> Needs | None:
    """Take the requirement options out of a send's options (Celery must not publish them).

    ``None`` when the call has no requirements and is no workflow node.

    Raises:
        WorkflowError: a requirement that is not a call this app knows, a wrong option.
    """
    requires = options.pop("requires", None)
    on_fail = options.pop("on_requirement_failure", None) or "fail"
    feeds = options.pop("pass_results", True)
    node = options.pop(NODE_OPTION, None)
    if on_fail not in ON_REQUIREMENT_FAILURE:
        raise WorkflowError(
            f"on_requirement_failure must be one of {ON_REQUIREMENT_FAILURE}, got {on_fail!r}"
        )
    if node is not None:
        pairs = tuple((str(i), str(g)) for i, g in node["requires"])
        future = True
    elif requires:
        pairs = tuple(_known(rt, i) for i in requirement_ids(rt.app, requires))
        future = False
    else:
        return None
    fields: dict[str, Any] = {}
    if pairs:
        fields = {"needs": [i for i, _ in pairs], "on_fail": on_fail, "feeds": bool(feeds)}
    return Needs(pairs, future, fields)


def _known(rt: Runtime, task_id: str) -> tuple[str, str]:
    group = locate(rt, task_id)
    if group is None:
        raise WorkflowError(
            f"requirement {task_id} is not a call this app knows: requires= takes gated calls "
            "and workflow nodes that are waiting, running, or ended within "
            "semaphore_history_ttl"
        )
    return task_id, group


def requirement_ids(app: Any, requires: Iterable[Any]) -> list[str]:
    """The ids of a ``requires=`` option (AsyncResults or task ids).

    Raises:
        WorkflowError: something else, or a result of another app.
    """
    ids = []
    for item in requires:
        if isinstance(item, str) and item:
            ids.append(item)
            continue
        task_id = getattr(item, "id", None)
        if not isinstance(task_id, str):
            raise WorkflowError(
                f"requires= takes AsyncResults or task ids of gated calls, got {item!r}"
            )
        other = getattr(item, "app", None)
        if other is not None and other is not app and getattr(other, "main", None) != app.main:
            raise WorkflowError(f"requirement {task_id} is a result of another app ({other.main})")
        ids.append(task_id)
    return ids


def locate(rt: Runtime, task_id: str) -> str | None:
    """The group that knows call ``task_id`` (live, or ended within its history), or None."""
    names = [*rt.known_groups(), FREE_GATE]
    pipe = rt.client.pipeline(transaction=False)
    for name in names:
        keys = rt.group(name).keys
        pipe.hexists(keys["calls"], task_id)
        pipe.hexists(keys["history"], task_id)
        pipe.zscore(keys["ended"], task_id)
    found = pipe.execute()
    for i, name in enumerate(names):
        if any(found[3 * i : 3 * i + 3]):
            return name
    return None


def link_requirements(
    rt: Runtime, group: str, task_id: str, requirements: Sequence[tuple[str, str]], future: bool
) -> None:
    """List the waiting call ``task_id`` of ``group`` as a dependent of each requirement
    ``(id, group)``; settle it at once for those that ended already."""
    own = rt.group(group)
    for rid, rgroup in requirements:
        code, state, payload, error, task = rt.group(rgroup).link(
            rid, own.tag, task_id, future=future
        )
        if code in (1, 3):
            continue
        if state in ("", "ENDED"):
            # Only its id is remembered (or it just went): the result backend says how it ended.
            meta = rt.app.AsyncResult(rid)
            backend_state = meta.state
            if backend_state == states.SUCCESS:
                state = "SUCCEEDED"
            elif backend_state == states.FAILURE:
                state, error = "FAILED", f"{type(meta.result).__name__}: {meta.result}"
            else:
                state = "CANCELLED"
        _, replies = own.satisfy(task_id, rid, state, payload=payload, text=error, task=task)
        rt.dispatch(group, replies)
