"""Graphviz pictures: a workflow's nodes and requirements, a gate's holders and next calls.

DOT is text built here; SVG needs the ``dot`` program of Graphviz.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable

from .errors import SemaphoreError
from .group import Group
from .views import text

__all__ = [
    "COLOURS",
    "GraphvizMissing",
    "dot_node",
    "gate_dot",
    "quote",
    "to_svg",
    "workflow_dot",
]

#: Fill colour per call state.
COLOURS = {
    "PENDING": "white",
    "WAITING": "lightgrey",
    "PARKED": "khaki",
    "DISPATCHED": "lightblue",
    "RUNNING": "deepskyblue",
    "RETRYING": "orange",
    "SUCCEEDED": "palegreen",
    "FAILED": "salmon",
    "CANCELLED": "grey",
    "EXPIRED": "grey",
    "DROPPED": "grey",
    "REPLACED": "grey",
}


class GraphvizMissing(SemaphoreError):
    """SVG was asked for, but Graphviz's ``dot`` program is not installed."""

    def __str__(self) -> str:
        return (
            "rendering SVG needs Graphviz's `dot` program, which is not on PATH; install "
            "graphviz (apt-get install graphviz, brew install graphviz) or use to_dot()"
        )


def quote(text: str) -> str:
    """A DOT string literal (quotes and backslashes escaped, line breaks kept as \\n)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def dot_node(task_id: str, task: str, state: str) -> str:
    """One call as a DOT node statement: task name and short id, filled by its state."""
    label = f"{task}\n{task_id[:8]}\n{state}"
    colour = COLOURS.get(state, "white")
    return f"{quote(task_id)} [label={quote(label)}, fillcolor={quote(colour)}];"


def to_svg(dot: str) -> str:
    """Render DOT text as SVG with Graphviz.

    Raises:
        GraphvizMissing: ``dot`` is not installed.
    """
    program = shutil.which("dot")
    if program is None:
        raise GraphvizMissing()
    done = subprocess.run(
        [program, "-Tsvg"], input=dot.encode(), capture_output=True, check=True, timeout=60
    )
    return done.stdout.decode()


def _state(record: dict[str, object] | None) -> str:
    if record is None:
        return "PENDING"
    return str(record.get("status") or record.get("state") or "PENDING").upper()


def gate_dot(group: Group, gate: str, parked_count: int = 10) -> str:
    """The live picture of a gate: its holders, its next parked calls in release order, and
    the requirements of those calls."""
    holders = list(group.holders())
    members = group.client.zrange(group.keys["queue"], 0, parked_count - 1)
    parked = [text(m).rsplit("\x1f", 1)[-1] for m in members]
    lines = [
        "digraph gate {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica"];',
        f"  label={quote(f'gate {gate}')};",
    ]
    edges: list[str] = []
    for title, ids in (("holding", holders), ("next parked", parked)):
        lines.append(f"  subgraph {quote('cluster_' + title)} {{")
        lines.append(f"    label={quote(title)};")
        for task_id in ids:
            record = group.history(task_id)
            task = str((record or {}).get("task") or "?")
            lines.append("    " + dot_node(task_id, task, _state(record)))
            edges.extend(_edges(task_id, (record or {}).get("needs")))
        lines.append("  }")
    lines.extend(f"  {edge}" for edge in edges)
    lines.append("}")
    return "\n".join(lines) + "\n"


def workflow_dot(nodes: Iterable[tuple[str, str, str, str, list[str]]]) -> str:
    """A workflow as DOT, from (id, task, state, cluster label or "", requirement ids) per
    node: nodes grouped in a subgraph per cluster (a gate), an edge per requirement."""
    nodes = list(nodes)
    clusters: dict[str, list[str]] = {}
    for task_id, task, state, cluster, _ in nodes:
        clusters.setdefault(cluster, []).append(dot_node(task_id, task, state))
    lines = [
        "digraph workflow {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica"];',
    ]
    for label, statements in clusters.items():
        if label:
            lines.append(f"  subgraph {quote('cluster_' + label)} {{")
            lines.append(f"    label={quote(label)};")
            lines.extend(f"    {s}" for s in statements)
            lines.append("  }")
        else:
            lines.extend(f"  {s}" for s in statements)
    for task_id, _, _, _, requires in nodes:
        lines.extend(f"  {quote(source)} -> {quote(task_id)};" for source in requires)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _edges(task_id: str, needs: object) -> Iterable[str]:
    if isinstance(needs, list):
        for requirement in needs:
            yield f"{quote(str(requirement))} -> {quote(task_id)};"
