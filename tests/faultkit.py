"""Fixtures and helpers of the fault tests: subprocess workers of ``tests.faultproj``, kills,
a restartable Redis that keeps its data, and the interval arithmetic of invariant 1.

Every process is started in its own session and killed by process group at the end of the
test, even when the test fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_semaphore import runtime_for
from celery_semaphore.group import Group
from celery_semaphore.server import PrivateRedis, free_port, start_private_redis

from . import faultproj
from .conftest import ROOT, wait_for

__all__ = [
    "Cluster",
    "Kill",
    "PersistentRedis",
    "Run",
    "Worker",
    "cluster_fixture",
    "descendants",
    "peak_overlap",
    "runs_of",
]

HOST = os.uname().nodename


@dataclasses.dataclass
class Worker:
    """A ``celery worker`` subprocess."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def host(self) -> str:
        return f"{self.name}@{HOST}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def children(self) -> set[int]:
        """The pool processes (and anything else) below the worker's main process."""
        return descendants(self.proc.pid)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclasses.dataclass(frozen=True)
class Kill:
    """Processes killed at time ``t`` (``time.time()``): a run on one of them ends at ``t``."""

    pids: frozenset[int]
    t: float


@dataclasses.dataclass(frozen=True)
class Run:
    """One execution of a task body, as the probe recorded it."""

    task_id: str
    pid: int
    start: float
    end: float
    fence: int  # 0 when the run had none (not a gated run)
    killed: bool


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from ``/proc``), not ``pid`` itself."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task_dir in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                for child in (task_dir / "children").read_text().split():
                    if int(child) not in found:
                        found.add(int(child))
                        todo.append(int(child))
    return found


def runs_of(events: list[dict[str, Any]], kills: Iterable[Kill], now: float) -> list[Run]:
    """Pair each ``start`` with its ``end``; a run without one ends where its process died.

    The death of a process is known from a kill of the test, or from a later ``start`` that
    watched the process (see ``Probe.watch``) and saw it dead. A run with neither is still
    running: it ends at ``now``.
    """
    deaths = [(k.t, k.pids) for k in kills]
    for ev in events:
        if ev["ev"] == "start":
            gone = set(ev.get("watched", ())) - set(ev.get("alive", ()))
            if gone:
                deaths.append((ev["t"], frozenset(gone)))
    open_runs: dict[tuple[str, int], dict[str, Any]] = {}
    runs: list[Run] = []
    for ev in sorted(events, key=lambda e: e["t"]):
        key = (ev["id"], ev["pid"])
        if ev["ev"] == "start":
            if key in open_runs:  # the same process started it again: the first run was cut
                runs.append(_cut(open_runs.pop(key), deaths, ev["t"]))
            open_runs[key] = ev
        elif ev["ev"] == "end" and key in open_runs:
            start = open_runs.pop(key)
            runs.append(
                Run(ev["id"], ev["pid"], start["t"], ev["t"], int(start.get("fence") or 0), False)
            )
    runs += [_cut(start, deaths, now) for start in open_runs.values()]
    return sorted(runs, key=lambda r: r.start)


def _cut(start: dict[str, Any], deaths: list[tuple[float, frozenset[int]]], default: float) -> Run:
    ends = [t for t, pids in deaths if start["pid"] in pids and t >= start["t"]]
    end = min(ends) if ends else max(start["t"], default)
    return Run(start["id"], start["pid"], start["t"], end, int(start.get("fence") or 0), bool(ends))


def peak_overlap(runs: Iterable[Run]) -> int:
    """The largest number of runs in progress at one instant (an end before a start at a tie)."""
    points = sorted(
        [(r.start, 1) for r in runs] + [(r.end, -1) for r in runs], key=lambda p: (p[0], p[1])
    )
    peak = current = 0
    for _, step in points:
        current += step
        peak = max(peak, current)
    return peak


class Cluster:
    """The workers and beats of one test, configured by ``env``; all killed at the end."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env = env
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.kills: list[Kill] = []
        self._app: Celery | None = None

    # -- the app as the test process sees it ------------------------------------------------

    @property
    def app(self) -> Celery:
        """The test's own app, built from the same variables as the workers' (built once)."""
        if self._app is None:
            self._app = faultproj.app_from_env(self.env)
        return self._app

    def configure(self, **variables: str) -> None:
        """Set ``CS_*`` variables; only before the app, a worker or a beat exists."""
        assert self._app is None and not self.procs, "configure before starting anything"
        self.env.update(variables)

    @property
    def probe(self) -> faultproj.Probe:
        return self.app.probe  # type: ignore[attr-defined, no-any-return]

    @property
    def gate(self) -> Group:
        ext = runtime_for(self.app)
        assert ext is not None
        return ext.group(faultproj.GATE)

    @property
    def lease(self) -> float:
        return float(self.env["CS_LEASE"])

    @property
    def tick(self) -> float:
        return float(self.env["CS_TICK"])

    # -- processes --------------------------------------------------------------------------

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        out = open(log, "ab")  # noqa: SIM115  closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.faultproj", *args],
            cwd=ROOT,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        self.procs.append(proc)
        return proc

    def worker(
        self,
        name: str,
        concurrency: int = 2,
        *,
        pool: str = "prefork",
        queues: str | None = None,
        wait: bool = True,
    ) -> Worker:
        """Start a worker; with ``wait``, return once it answers a ping."""
        log = self.tmp / f"{name}.log"
        args = ["worker", "-P", pool, "-n", f"{name}@%h", "-Q", queues or self.env["CS_QUEUE"]]
        if pool != "solo":
            args += ["-c", str(concurrency)]
        args += ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"]
        worker = Worker(name, self._spawn(args, log), log)
        if wait:
            self.wait_ready(worker)
        return worker

    def wait_ready(self, worker: Worker) -> None:
        wait_for(
            lambda: not worker.alive() or self.app.control.ping([worker.host], timeout=0.3),
            timeout=60,
            what=f"worker {worker.host} to answer a ping",
        )
        assert worker.alive(), worker.output()

    def beat(self, name: str = "beat") -> subprocess.Popen[bytes]:
        """Start ``celery beat`` with a schedule file of its own."""
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
            self.tmp / f"{name}.log",
        )

    def kill_pid(self, pid: int) -> Kill:
        """SIGKILL one process (a pool child) and remember when."""
        os.kill(pid, signal.SIGKILL)
        kill = Kill(frozenset({pid}), time.time())
        self.kills.append(kill)
        return kill

    def kill_worker(self, worker: Worker) -> Kill:
        """SIGKILL a whole worker (its process group) and remember when."""
        pids = frozenset(worker.children() | {worker.pid})
        os.killpg(worker.pid, signal.SIGKILL)
        kill = Kill(pids, time.time())
        self.kills.append(kill)
        worker.proc.wait(10)
        return kill

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        # A pool child outlives a main process killed alone (cold shutdown cut short):
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    # -- what the tasks recorded ------------------------------------------------------------

    def runs(self) -> list[Run]:
        return runs_of(self.probe.events(), self.kills, time.time())

    def started(self, task_id: str) -> dict[str, Any] | None:
        """The latest ``start`` event of ``task_id``, or ``None``."""
        starts = [e for e in self.probe.events("start") if e["id"] == task_id]
        return starts[-1] if starts else None

    def wait_started(self, task_id: str, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until ``task_id`` runs; return its ``start`` event (with its pid and fence)."""
        return wait_for(lambda: self.started(task_id), timeout, f"call {task_id} to start")  # type: ignore[no-any-return]

    def watch(self, pid: int) -> None:
        """Have later runs record whether ``pid`` still lives (for runs Celery cut short)."""
        self.probe.watch(pid)

    def count(self, event: str, task_id: str) -> int:
        return sum(1 for e in self.probe.events(event) if e["id"] == task_id)

    def slot_free_of(self, task_id: str) -> bool:
        return task_id not in self.gate.holders()


class PersistentRedis:
    """A private redis-server whose data survives :meth:`stop` and :meth:`start`.

    ``PrivateRedis.restart`` starts an empty server; the outage tests need the slots to come
    back as they were, as from a server with persistence.
    """

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("the outage test needs redis-server on PATH")
        self._server: PrivateRedis | None = None
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if self._server is None:
            self._server = start_private_redis(port=self.port)
        else:
            self._server.start()

    def stop(self) -> None:
        """Save the data set and stop the server (``SHUTDOWN SAVE``)."""
        if self._server is not None:
            self._server.stop(keep_data=True)

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()


@pytest.fixture(name="cluster")
def cluster_fixture(
    urls: dict[str, str], prefix: str, tmp_path: Path, gate_shape: str
) -> Iterator[Cluster]:
    """Workers and beats of ``tests.faultproj`` for this test; short lease and tick by default."""
    env = dict(os.environ)
    env.update(
        CS_SHAPE=gate_shape,
        CS_BROKER=urls["broker"],
        CS_BACKEND=urls["backend"],
        CS_SLOTS=urls["slots"],
        CS_PROBE=urls["probe"],
        CS_PREFIX=prefix,
        CS_QUEUE=prefix,
        CS_LEASE="1.5",
        CS_TICK="0.5",
        CS_LIMIT="1",
        PYTHONPATH=str(ROOT),
    )
    cluster = Cluster(env, tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop_all()
        with contextlib.suppress(Exception), cluster.app.connection_for_write() as conn:
            conn.default_channel.client.delete(prefix)
