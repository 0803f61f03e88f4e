"""The Markdown table: one row per figure, each beside its target with met / missed."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any

__all__ = ["Row", "as_json", "conditions", "failed_row", "render", "verdict"]


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table.

    Attributes:
        scenario: the scenario number and name, e.g. ``"1 overhead"``.
        figure: what is measured.
        measured: the value as printed (median and spread).
        target: the target (issues 5 and 9), or ``"—"`` for a reference figure.
        verdict: ``"met"``, ``"missed"``, ``"info"`` or ``"failed"``.
        facts: what the smoke test checks (see :func:`as_json`).
    """

    scenario: str
    figure: str
    measured: str
    target: str = "—"
    verdict: str = "info"
    #: Counts and peaks behind the figure (calls sent / completed, peak units held...), for
    #: ``--json`` and the smoke test; not printed in the table.
    facts: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)


def verdict(ok: bool | None) -> str:
    """``met`` / ``missed``; ``n/a`` when the figure could not be measured."""
    if ok is None:
        return "n/a"
    return "met" if ok else "missed"


def failed_row(scenario: str, error: BaseException) -> Row:
    """The row a scenario leaves when it could not run to its end."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return Row(
        scenario, "scenario failed", f"{type(error).__name__}: {message[:150]}", "—", "failed"
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: Iterable[Row], notes: Iterable[str] = ()) -> str:
    """The Markdown table of ``rows``, followed by ``notes`` as a bullet list."""
    lines = [
        "| Scenario | Figure | Measured: median (min-max) | Target | Verdict |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        cells = (row.scenario, row.figure, row.measured, row.target, row.verdict)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    notes = list(notes)
    if notes:
        lines.append("")
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def as_json(rows: Iterable[Row], lines: Iterable[str]) -> dict[str, Any]:
    """The rows with their facts, and the condition lines, for ``--json``."""
    return {"conditions": list(lines), "rows": [dataclasses.asdict(row) for row in rows]}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _redis_server_version() -> str:
    try:
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip() or "unknown"


def conditions(settings: Mapping[str, object], load_before: tuple[float, ...]) -> list[str]:
    """Lines describing the machine and the run, printed above the table."""
    load_after = os.getloadavg()
    return [
        f"machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}",
        "load average (1/5/15 min) before: "
        + "/".join(f"{x:.2f}" for x in load_before)
        + ", after: "
        + "/".join(f"{x:.2f}" for x in load_after),
        f"celery {_version('celery')}, kombu {_version('kombu')}, redis-py {_version('redis')}, "
        f"redis-server {_redis_server_version()}, celery_semaphore "
        f"{_version('celery-semaphore')}, dramatiq {_version('dramatiq')}",
        "run: " + ", ".join(f"{k} {v}" for k, v in settings.items()),
    ]
