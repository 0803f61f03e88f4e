"""Fixtures: a private redis-server per session, an app per test, real workers.

Tests never flush a Redis they did not start. With ``CELERY_SEMAPHORE_TEST_REDIS_URL`` set,
they use that server instead, and isolate themselves by key prefix and queue name only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import celery.contrib.testing.tasks  # noqa: F401  registers celery.ping for start_worker
import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_semaphore.server import start_private_redis

from . import proj

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_base() -> Iterator[str]:
    """``redis://host:port`` of the test Redis (without a database number)."""
    external = os.environ.get("CELERY_SEMAPHORE_TEST_REDIS_URL")
    if external:
        yield external.rstrip("/").rsplit("/", 1)[0] if external.count("/") > 2 else external
        return
    server = start_private_redis()
    try:
        yield server.url.rsplit("/", 1)[0]
    finally:
        server.stop()


@pytest.fixture
def prefix() -> str:
    """A key prefix and queue name of this test alone."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def urls(redis_base: str) -> dict[str, str]:
    """Database per role: slots, broker, results, probe counters."""
    return {
        "slots": f"{redis_base}/0",
        "broker": f"{redis_base}/1",
        "backend": f"{redis_base}/2",
        "probe": f"{redis_base}/3",
    }


@pytest.fixture
def slots(urls: dict[str, str]) -> redis.Redis:
    """A client of the slots database."""
    return redis.Redis.from_url(urls["slots"])


def slot_keys(client: redis.Redis, prefix: str) -> list[str]:
    """Every slot key under ``prefix``."""
    return sorted(k.decode() for k in client.scan_iter(match=f"{{{prefix}:*", count=1000))


#: What a semaphore keeps at rest, whatever it ran: its state hash and its free-slot set.
AT_REST = ("state", "free")


def at_rest(prefix: str, *gates: str) -> list[str]:
    """The keys ``gates`` keep once no call is parked, held or remembered."""
    return sorted(f"{{{prefix}:{gate}}}:{part}" for gate in gates for part in AT_REST)


@pytest.fixture
def make_app(urls: dict[str, str], prefix: str) -> Callable[..., Celery]:
    """Build this test's app (see tests/proj.py)."""

    def make(limit: int = 3, **conf: Any) -> Celery:
        return proj.create_app(
            f"proj-{prefix}",
            broker=urls["broker"],
            backend=urls["backend"],
            slots_url=urls["slots"],
            probe_url=urls["probe"],
            prefix=prefix,
            queue=prefix,
            limit=limit,
            **conf,
        )

    return make


@contextlib.contextmanager
def threads_worker(app: Celery, concurrency: int = 8) -> Iterator[Any]:
    """An in-process worker of the threads pool, ready when the block starts."""
    with start_worker(
        app,
        pool="threads",
        concurrency=concurrency,
        perform_ping_check=True,
        loglevel="WARNING",
        shutdown_timeout=30,
    ) as worker:
        yield worker


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Processes:
    """Subprocess workers and beats of one test, all killed at the end."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env = env
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        out = open(self.tmp / log, "wb")  # noqa: SIM115  closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.proj", *args],
            cwd=ROOT,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def worker(self, name: str, concurrency: int = 8, *extra: str) -> subprocess.Popen[bytes]:
        """Start a prefork worker and wait until it answers a ping."""
        proc = self._spawn(
            [
                "worker",
                "-P",
                "prefork",
                "-c",
                str(concurrency),
                "-n",
                f"{name}@%h",
                "-Q",
                self.env["CS_QUEUE"],
                "--without-gossip",
                "--without-mingle",
                "-l",
                "WARNING",
                *extra,
            ],
            f"{name}.log",
        )
        app = proj.app_from_env(self.env)
        host = f"{name}@{os.uname().nodename}"
        wait_for(
            lambda: proc.poll() is not None or app.control.ping([host], timeout=0.5),
            timeout=60,
            what=f"worker {host} to answer a ping",
        )
        assert proc.poll() is None, (self.tmp / f"{name}.log").read_text()
        return proc

    def beat(self, name: str = "beat") -> subprocess.Popen[bytes]:
        """Start celery beat with a schedule file of this test."""
        return self._spawn(
            [
                "beat",
                "-s",
                str(self.tmp / f"{name}-schedule"),
                "-l",
                "INFO",
                "--pidfile",
                str(self.tmp / f"{name}.pid"),
            ],
            f"{name}.log",
        )

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture
def processes(urls: dict[str, str], prefix: str, tmp_path: Path) -> Iterator[Processes]:
    """Start subprocess workers and beats with this test's configuration."""
    env = dict(os.environ)
    env.update(
        CS_BROKER=urls["broker"],
        CS_BACKEND=urls["backend"],
        CS_SLOTS=urls["slots"],
        CS_PROBE=urls["probe"],
        CS_PREFIX=prefix,
        CS_QUEUE=prefix,
        PYTHONPATH=str(ROOT),
    )
    procs = Processes(env, tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()
