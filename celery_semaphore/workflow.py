"""``Workflow``: calls that require other calls, as an arbitrary graph, waiting in Redis.

Nodes are sent at once, sinks first: each waits in its gate's Redis (taking no slot, reaching
no broker) until its last requirement ended, then competes for its gate like any other call.
Results flow as in a chain; a failure or a cancellation reaches the dependents.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from celery import Celery, states
from celery.canvas import Signature
from celery.result import AsyncResult
from kombu.utils.uuid import uuid

from .errors import WorkflowError
from .extension import install
from .followups import workflow_key
from .graph import to_svg, workflow_dot
from .requires import (
    FREE_GATE,
    NODE_OPTION,
    ON_REQUIREMENT_FAILURE,
    locate,
    requirement_ids,
    send_waiting,
)
from .runtime import WORKFLOW_HEADER, Runtime
from .workflow_run import WorkflowRun

__all__ = ["Node", "Workflow", "WorkflowRun"]

#: How long the node list of a fail_fast workflow is kept in Redis.
NODES_TTL_S = 7 * 24 * 3600


class Node:
    """One call of a :class:`Workflow`: a signature, its id, the calls it requires."""

    def __init__(
        self, workflow: Workflow, signature: Signature, requires: list[Any], on_fail: str
    ) -> None:
        self.workflow = workflow
        self.signature = signature
        self.id: str = signature.options.get("task_id") or uuid()
        self.requires = requires
        self.on_requirement_failure = on_fail

    @property
    def task(self) -> str:
        """The node's task name."""
        return str(self.signature.task)

    def __repr__(self) -> str:
        return f"<Node {self.task}[{self.id[:6]}]>"


class Workflow:
    """A graph of calls, each started once the calls it requires have ended.

    Args:
        app: the Celery app of every node.
        fail_fast: at the first failure anywhere, cancel every node that has not started.
        track: log each state transition of every node (see ``@gated(track=...)``).
        on_requirement_failure: ``"fail"`` (a dependent of a failed call ends FAILURE with
            ``RequirementFailed`` without running), ``"pass"`` (it runs and receives the
            exception in place of the result) or ``"cancel"`` (it ends REVOKED without
            running); per node through :meth:`add`. By default ``"fail"``, and ``"cancel"``
            with ``fail_fast`` (every node that has not started is cancelled then).

    Examples:
        >>> wf = Workflow(app)
        >>> a = wf.add(fetch.s("https://example.org"))
        >>> b = wf.add(parse.s(), requires=[a])
        >>> c = wf.add(parse.s(), requires=[a])
        >>> d = wf.add(merge.s(), requires=[b, c])  # gets [b's result, c's result]
        >>> run = wf.apply_async()
        >>> run.get(timeout=60)
    """

    def __init__(
        self,
        app: Celery,
        *,
        fail_fast: bool = False,
        track: bool = False,
        on_requirement_failure: str | None = None,
    ) -> None:
        if on_requirement_failure is None:
            on_requirement_failure = "cancel" if fail_fast else "fail"
        _check_policy(on_requirement_failure)
        self.app = app
        self.id = uuid()
        self.fail_fast = fail_fast
        self.track = track
        self.on_requirement_failure = on_requirement_failure
        self.nodes: list[Node] = []
        self.run: WorkflowRun[Node] | None = None

    def add(
        self,
        signature: Signature | Any,
        requires: Iterable[Node | AsyncResult | str] = (),
        *,
        on_requirement_failure: str | None = None,
    ) -> Node:
        """Add a call; it starts once every call in ``requires`` ended (nodes of this
        workflow, or AsyncResults / ids of gated calls sent before)."""
        policy = on_requirement_failure or self.on_requirement_failure
        _check_policy(policy)
        sig = self.app.signature(signature)
        node = Node(self, sig, list(requires), policy)
        self.nodes.append(node)
        return node

    def apply_async(self) -> WorkflowRun[Node]:
        """Send every node; returns at once.

        Raises:
            WorkflowError: a cycle, a node of another workflow or app, a requirement that does
                not exist (nothing was sent then).
        """
        if self.run is not None:
            raise WorkflowError(f"workflow {self.id} was applied already")
        rt = install(self.app)
        order = self._order()
        groups = {node.id: _group_of(rt, node.task) for node in self.nodes}
        outside = self._outside(rt)
        if self.fail_fast:
            key = workflow_key(rt.settings.key_prefix, self.id)
            rt.client.hset(key, mapping=dict(groups))  # type: ignore[arg-type]
            rt.client.expire(key, NODES_TTL_S)
        sent: list[Node] = []
        try:
            for node in reversed(order):  # sinks first: every link precedes its requirement
                pairs = [
                    (r.id, groups[r.id]) if isinstance(r, Node) else outside[_id(self.app, r)]
                    for r in node.requires
                ]
                headers = {**(node.signature.options.get("headers") or {})}
                headers[WORKFLOW_HEADER] = f"{self.id}:{int(self.fail_fast)}"
                sig = node.signature
                options = {
                    **sig.options,
                    "task_id": node.id,
                    "headers": headers,
                    "track": self.track,
                    "on_requirement_failure": node.on_requirement_failure,
                    "pass_results": not sig.immutable,
                    NODE_OPTION: {"requires": pairs},
                }
                send_waiting(self.app, node.task, sig.args, sig.kwargs, options)
                sent.append(node)
        except BaseException:
            for node in sent:  # they all still wait for a requirement: none ran
                rt.group(groups[node.id]).cancel(node.id, reason="its workflow failed to send")
            raise
        self.run = WorkflowRun(self, {n: self.app.AsyncResult(n.id) for n in self.nodes})
        return self.run

    def _order(self) -> list[Node]:
        """The nodes, requirements first; raises WorkflowError on a cycle or a stranger."""
        mine = set(map(id, self.nodes))
        for node in self.nodes:
            for r in node.requires:
                if isinstance(r, Node) and id(r) not in mine:
                    other = r.workflow.app
                    where = "another app" if other is not self.app else "another workflow"
                    raise WorkflowError(f"{node!r} requires {r!r}, a node of {where}")
        order: list[Node] = []
        state: dict[int, int] = {}  # 1 visiting, 2 done

        def visit(node: Node, path: list[Node]) -> None:
            if state.get(id(node)) == 2:
                return
            if state.get(id(node)) == 1:
                cycle = " -> ".join(repr(n) for n in [*path[path.index(node) :], node])
                raise WorkflowError(f"the workflow has a cycle: {cycle}")
            state[id(node)] = 1
            for r in node.requires:
                if isinstance(r, Node):
                    visit(r, [*path, node])
            state[id(node)] = 2
            order.append(node)

        for node in self.nodes:
            visit(node, [])
        return order

    def _outside(self, rt: Runtime) -> dict[str, tuple[str, str]]:
        """Requirements that are not nodes: each must be a call this app knows."""
        found: dict[str, tuple[str, str]] = {}
        for node in self.nodes:
            others = [r for r in node.requires if not isinstance(r, Node)]
            for task_id in requirement_ids(self.app, others):
                group = locate(rt, task_id)
                if group is None:
                    raise WorkflowError(
                        f"{node!r} requires {task_id}, which is not a call this app knows"
                    )
                found[task_id] = (task_id, group)
        return found

    def states(self) -> dict[Node, str]:
        """Each node's state: from its gate's record or history, else its result backend."""
        rt = install(self.app)
        out = {}
        for node in self.nodes:
            record = rt.group(_group_of(rt, node.task)).history(node.id) if self.run else None
            state = str((record or {}).get("status") or (record or {}).get("state") or "")
            if not state and self.run is not None:
                state = _BACKEND_STATES.get(self.app.AsyncResult(node.id).state, "WAITING")
            out[node] = state or "PENDING"
        return out

    def to_dot(self) -> str:
        """The workflow as Graphviz DOT: nodes by task and short id, coloured by state,
        edges for requirements, gated nodes grouped by gate."""
        rt = install(self.app)
        current = self.states()
        nodes = []
        for node in self.nodes:
            gates = rt.gates_of(node.task)
            requires = [r.id if isinstance(r, Node) else _id(self.app, r) for r in node.requires]
            cluster = f"gate {gates.gate}" if gates is not None else ""
            nodes.append((node.id, node.task, current[node], cluster, requires))
        return workflow_dot(nodes)

    def to_svg(self) -> str:
        """The workflow as SVG; raises ``GraphvizMissing`` when ``dot`` is not installed."""
        return to_svg(self.to_dot())


_BACKEND_STATES = {
    states.SUCCESS: "SUCCEEDED",
    states.FAILURE: "FAILED",
    states.REVOKED: "CANCELLED",
    states.STARTED: "RUNNING",
    states.RETRY: "RETRYING",
}


def _check_policy(policy: str) -> None:
    if policy not in ON_REQUIREMENT_FAILURE:
        raise WorkflowError(
            f"on_requirement_failure must be one of {ON_REQUIREMENT_FAILURE}, got {policy!r}"
        )


def _group_of(rt: Runtime, task: str) -> str:
    gates = rt.gates_of(task)
    return gates.group if gates is not None else FREE_GATE


def _id(app: Celery, requirement: Any) -> str:
    return requirement_ids(app, [requirement])[0]
