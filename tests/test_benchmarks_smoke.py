"""The benchmark harness runs a tiny configuration of every scenario and prints its table.

Speed is not asserted (a tiny run on a busy machine says nothing about it), but what each
scenario counted is: every call sent ran exactly once, a gate never had more running than
its limit and did reach it, the fairness figure is within its bound, the groups driven
directly end at rest, and every workflow node started after its requirements ended. Scenario
11 and scenario 4's "one Redis" row run with the gates in the broker's database.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

# It starts celery worker subprocesses (scenarios 1-6 and 9-11).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

# One row per scenario that the README's performance section relies on.
EXPECTED_ROWS = (
    "| 1 overhead | gated / plain |",
    "| 1 overhead | gated / plain, one Redis (broker push) |",
    "| 1 overhead | worker CPU added per gated call, two Redis / one Redis |",
    "| 2 utilisation 10 ms | celery_semaphore, one Redis / relay ceiling |",
    "| 3 hand-off | gate hand-off p50 - hop floor p50, one Redis |",
    "| 2 utilisation 10 ms | celery_semaphore / relay ceiling |",
    "| 2 utilisation 10 ms | in-task Redis semaphore + self.retry(), / (N/d) |",
    "| 3 hand-off | gate hand-off p50 - hop floor p50 |",
    "| 3 hand-off | gate hand-off p99 |",
    "| 4 submit | gated (free slot) / plain, calls/s |",
    "| 4 submit | gated (free slot) / plain, calls/s, one Redis |",
    "| 5 Redis cost | round trips per call, free gate",
    "| 6 worker memory | peak RSS with - without |",
    "| 7 backlog | time to park 2,000 calls",
    "| 7 backlog | Redis memory per parked call",
    "| 7 backlog | drain rate, last / first window |",
    "| 8 fairness | grants to the big key",
    "| 9 stacked | Group level, stacked / plain |",
    "| 9 stacked | end to end, stacked / plain |",
    "| 10 workflow | requirement hop / hop floor, p50 / p99 |",
    "| 10 workflow | total time, workflow / canvas |",
    "| 11 user 10 ms, one Redis | gate / relay ceiling (same way) |",
    "| 11 user 10 ms, two Redis | gate / relay ceiling (same way) |",
    "| 11 user 100 ms, one Redis | 20 gated calls (limit 4, -c 8) sent while consuming",
    "| 11 user 100 ms, two Redis | 20 gated calls (limit 4, -c 8) sent while consuming",
)
LIMIT = 4
BACKLOG = 2000


def _run(tmp_path: Path) -> tuple[str, str, dict[str, list[dict[str, Any]]]]:
    table, facts = tmp_path / "table.md", tmp_path / "rows.json"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--scale", "0.02", "--reps", "1",
         "--memory-calls", "100", "--durations", "10", "--no-dramatiq", "--limit", str(LIMIT),
         "--backlog", str(BACKLOG), "--output", str(table), "--json", str(facts)],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    by_scenario: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in json.loads(facts.read_text())["rows"]:
        if row["facts"]:
            by_scenario[row["scenario"].split()[0]].append(row["facts"])
    return out.stdout, table.read_text(), by_scenario


def test_a_tiny_benchmark_run_checks_every_scenario(tmp_path: Path) -> None:
    stdout, text, facts = _run(tmp_path)

    # The table: printed, complete, and every verdict one of the known ones.
    assert text in stdout
    assert "| Scenario | Figure | Measured: median (min-max) | Target | Verdict |" in text
    for row in EXPECTED_ROWS:
        assert row in text, f"missing row {row!r} in:\n{text}"
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    verdicts = {line.rstrip(" |").rsplit("| ", 1)[1] for line in rows}
    assert verdicts <= {"met", "missed", "info", "met (at 100 calls)", "missed (at 100 calls)"}

    # 1: every call of every variant ran once.
    (f,) = facts["1"]
    assert f["calls_sent"] == f["calls_completed"]
    assert set(f["calls_sent"]) == {"plain", "gated", "gated-shared", "in-task"}

    # 2 and 3: the gate reached its limit and never went over it (from the tasks' own times),
    # with the gates on their own Redis, in the broker's, and there with calls held ahead.
    assert len(facts["2"]) == len(facts["3"]) == 3
    for f in facts["2"]:
        assert f["calls_completed"] == f["calls_sent"] > 0
        assert f["peak_running"] == f["limit"] == LIMIT
    for f in facts["3"]:
        assert f["calls_completed"] == f["calls_sent"] > 0
        assert f["peak_running"] == f["limit"] == 1

    # 4: a full gate parks every call sent to it (the filler keeps its one unit); the calls
    # timed on a free gate, on its own Redis and on the broker's, were all given back.
    (f,) = facts["4"]
    assert f["full_parked"] == f["calls_sent"]["full"] > 0
    assert (f["full_held"], f["free_held"], f["free_shared_held"]) == (1, 0, 0)

    # 5 and 6: every call ran once.
    assert [g["gate"] for g in facts["5"]] == ["free", "limited"]
    for f in facts["5"]:
        assert f["calls_completed"] == f["calls_sent"] > 0
    (f,) = facts["6"]
    assert f["calls_completed"] == {"plain": f["calls_sent"], "gated": f["calls_sent"]}

    # 7: the whole backlog parked, then started once each, never more than the limit held;
    # afterwards only the group's state hash is left in Redis.
    (f,) = facts["7"]
    assert f["calls_sent"] == f["calls_parked"] == f["calls_completed"] == BACKLOG
    assert f["peak_used"] == f["limit"] == LIMIT
    assert f["used_during_drain"] == [LIMIT] * 4
    assert f["at_rest"] and f["keys_left"] == ["{bench:backlog}:state"]

    # 8: the small key's 10 calls all started within 10 + 2 x limit grants to the big key,
    # with no key limit, a key limit below the gate's, and one equal to it.
    assert [f["key_limit"] for f in facts["8"]] == [0, LIMIT // 2, LIMIT]
    for f in facts["8"]:
        assert f["bound"] == 10 + 2 * LIMIT
        assert f["big_grants_before_small_done"] is not None
        assert f["big_grants_before_small_done"] <= f["bound"]
        assert f["calls_completed"] == f["calls_sent"] == f["big_backlog"] + 10
        assert f["peak_used"] == LIMIT and f["peak_key"] == (f["key_limit"] or LIMIT)
        assert f["at_rest"]

    # 9: every call through both gates ran once, at the Group level and end to end.
    (f,) = facts["9"]
    assert f["calls_completed"] == f["calls_sent"] > 0
    assert f["e2e_calls_completed"] == f["e2e_calls_sent"] > 0
    assert f["e2e_stacked_group"] == "stacked"
    assert f["e2e_stacked_gates"] == ["sapi", "sdb"]
    assert f["e2e_stacked_used"] == [0, 0]
    assert f["at_rest"]
    assert f["keys_left"] == ["{bench:plain}:state", "{bench:stacked}:state"]

    # 10: every node of the workflow and of its canvas ran once, the gate never ran more than
    # its limit, and every node of the workflow started after each of its requirements ended.
    (f,) = facts["10"]
    assert f["nodes_completed"] == f["nodes_sent"] > 0
    assert f["canvas_nodes_completed"] == f["canvas_nodes_sent"] == f["nodes_sent"]
    assert 0 < f["peak_running"] <= f["limit"] == LIMIT
    assert f["order_violations"] == 0
    requires, runs = f["requires"], f["runs"]
    assert sorted(runs) == sorted(requires) and len(requires) == f["nodes_sent"]
    assert {node: len(r) for node, r in runs.items()} == dict.fromkeys(requires, 1)
    assert sum(len(reqs) for reqs in requires.values()) > 0
    for node, reqs in requires.items():
        started = runs[node][0][0]
        late = [r for r in reqs if runs[r][0][1] > started]
        assert not late, f"{node} started before {late} ended"

    # 11: in both layouts and at both durations, every call sent while the worker consumed
    # ran once, gated and relayed, and the gate reached its limit and never went over it.
    assert sorted((f["layout"], f["ms"]) for f in facts["11"]) == [
        ("separate", 10.0),
        ("separate", 100.0),
        ("shared", 10.0),
        ("shared", 100.0),
    ]
    for f in facts["11"]:
        assert f["calls_completed"] == f["calls_sent"] > 0, f
        assert f["relay_calls_completed"] == f["relay_calls_sent"] == f["calls_sent"], f
        assert f["peak_running"] == f["limit"] == LIMIT, f
