"""The benchmark harness runs a tiny configuration and prints its table (speed is not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# One row per scenario that the README's performance section relies on.
EXPECTED_ROWS = (
    "| 1 overhead | gated / plain |",
    "| 2 utilisation 10 ms | celery_semaphore / relay ceiling |",
    "| 2 utilisation 10 ms | in-task Redis semaphore + self.retry(), / (N/d) |",
    "| 3 hand-off | gate hand-off p50 - hop floor p50 |",
    "| 3 hand-off | gate hand-off p99 |",
    "| 4 submit | gated (free slot) / plain, calls/s |",
    "| 5 Redis cost | round trips per call, free gate",
    "| 6 worker memory | peak RSS with - without |",
)


def test_a_tiny_benchmark_run_prints_a_markdown_table_with_every_scenario(tmp_path: Path) -> None:
    table = tmp_path / "table.md"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--scale", "0.02", "--reps", "1",
         "--memory-calls", "100", "--durations", "10", "--no-dramatiq", "--output", str(table)],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    text = table.read_text()
    assert text in out.stdout
    assert "| Scenario | Figure | Measured: median (min-max) | Target | Verdict |" in text
    for row in EXPECTED_ROWS:
        assert row in text, f"missing row {row!r} in:\n{text}"
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    verdicts = {line.rstrip(" |").rsplit("| ", 1)[1] for line in rows}
    assert verdicts <= {"met", "missed", "info", "met (at 100 calls)", "missed (at 100 calls)"}
