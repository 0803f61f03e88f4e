"""What a script's follow-ups bring about: traces of tracked calls, calls a requirement ended
without running them, notices to other groups that a requirement ended, and fail_fast.

Every script reply passes through :func:`follow` (set as ``Runtime.follow`` by ``install``).
"""

from __future__ import annotations

from collections.abc import Sequence

from celery.utils.log import get_logger

from .errors import RequirementFailed
from .message import Envelope
from .outcome import Ended, Notice, Reply, Trace
from .results import fail_call, record_revoked
from .runtime import WORKFLOW_HEADER, Runtime
from .views import text

__all__ = ["fail_fast", "follow", "track_line", "workflow_key"]

logger = get_logger(__name__)
track_logger = get_logger("celery_semaphore.track")


def track_line(task: str, task_id: str, source: str, event: str, target: str) -> str:
    """One transition as ``track=True`` logs it: ``fetch[3f2a9c] PARKED->grant->DISPATCHED``."""
    return f"{task or '?'}[{task_id[:6]}] {source}->{event}->{target}"


def follow(rt: Runtime, group: str, replies: Sequence[Reply]) -> None:
    """Act on the follow-ups of a script's reply (see :meth:`Runtime.dispatch`)."""
    for item in replies:
        if isinstance(item, Trace):
            track_logger.info(
                track_line(item.task, item.task_id, item.source, item.event, item.target)
            )
        elif isinstance(item, Ended):
            _ended(rt, item)
        elif isinstance(item, Notice):
            _notice(rt, group, item)


def _ended(rt: Runtime, item: Ended) -> None:
    """A waiting call will never run: store its final state where its caller looks."""
    if item.state == "FAILED":
        exc = RequirementFailed(item.cause_task, item.cause_id, item.cause_text)
        fail_call(rt.app, item.task_id, exc, item.message)
    else:
        reason = f"requirement {item.cause_task}[{item.cause_id}] {item.cause_text}"
        record_revoked(rt.app, item.task_id, reason)
    if rt.on_node_failed is not None and item.state == "FAILED":
        workflow = _header(item.message, WORKFLOW_HEADER)
        if workflow:
            rt.on_node_failed(item.task_id, workflow)


def _header(message: bytes, name: str) -> str:
    try:
        headers = Envelope.decode(message).publish_kwargs.get("headers") or {}
    except ValueError:
        return ""
    return str(headers.get(name) or "")


def workflow_key(prefix: str, workflow_id: str) -> str:
    """The hash of a fail_fast workflow's nodes: node id -> its group."""
    return f"{{{prefix}:workflow:{workflow_id}}}:nodes"


def fail_fast(rt: Runtime, task_id: str, workflow: str) -> None:
    """A node of a workflow failed: with fail_fast, cancel every node that has not started."""
    workflow_id, _, flag = workflow.partition(":")
    if flag != "1":
        return
    nodes = rt.client.hgetall(workflow_key(rt.settings.key_prefix, workflow_id))
    for raw_id, raw_group in nodes.items():
        node, group = text(raw_id), text(raw_group)
        if node == task_id:
            continue
        state, replies = rt.group(group).cancel(node, reason=f"fail_fast: {task_id} failed")
        rt.dispatch(group, replies)
        if state and state != "running":
            record_revoked(rt.app, node, f"fail_fast: workflow node {task_id} failed")


def _notice(rt: Runtime, source: str, item: Notice) -> None:
    """Tell the dependent's group that its requirement ended, then forget the notice."""
    prefix = f"{{{rt.settings.key_prefix}:"
    if not (item.tag.startswith(prefix) and item.tag.endswith("}")):
        logger.error("celery_semaphore: a dependent in unknown group %r; ignored", item.tag)
        return
    name = item.tag[len(prefix) : -1]
    _, replies = rt.group(name).satisfy(
        item.dependent,
        item.requirement,
        item.state,
        payload=item.payload,
        text=item.text,
        task=item.task,
    )
    rt.dispatch(name, replies)
    rt.group(source).acknowledge(item.member)
