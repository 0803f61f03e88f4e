"""What one benchmark run owns: two private Redis servers and the worker subprocesses.

The broker and the probe records share one ``redis-server``; the slots live on a second one,
so ``INFO commandstats`` of the slots server counts celery_semaphore's traffic and nothing of
the broker's. That is the ``separate`` layout; in the ``shared`` layout (scenarios 4 and 11)
the gates live on the broker's server, in the broker's database, under a key prefix of their
own: one Redis for everything, as many deployments run it; the ``prefetch`` layout (scenarios 2
and 3) is the shared one with ``semaphore_prefetch`` set. :meth:`Cluster.close` stops every
process the run started, by pid, even when a scenario failed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery

from celery_semaphore.server import PrivateRedis, start_private_redis

from . import proj

__all__ = ["LAYOUTS", "ROOT", "Cluster", "Worker", "cpu_seconds", "process_tree", "memory_kib"]

ROOT = Path(__file__).resolve().parent.parent

#: Where the gates live: ``separate`` on a redis-server of their own, ``shared`` on the
#: broker's (same database).
LAYOUTS = ("separate", "shared", "prefetch")


class Worker:
    """A worker subprocess consuming one queue of its own."""

    def __init__(
        self, name: str, queue: str, proc: subprocess.Popen[bytes], log: Path, kind: str
    ) -> None:
        self.name = name
        self.hostname = f"{name}@{socket.gethostname()}"
        self.queue = queue
        self.proc = proc
        self.log = log
        self.kind = kind

    @property
    def pid(self) -> int:
        """The worker's main process id."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The end of the worker's log, for error messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Cluster:
    """Private Redis servers, the harness's Celery apps and the workers of one run.

    Args:
        limit: limit of the gate under test (``limited``) and of the in-task semaphore.
        free_limit: limit of the gate that never fills (``free``).
        workdir: where worker logs go; a temporary directory when ``None``.
    """

    def __init__(self, limit: int, free_limit: int = 2000, workdir: Path | None = None) -> None:
        self.limit = limit
        self.free_limit = free_limit
        self.run_id = uuid.uuid4().hex[:8]
        self.prefix = f"bench{self.run_id}"
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="celery-semaphore-bench-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workers: list[Worker] = []
        self._servers: list[PrivateRedis] = []
        try:
            self.broker_server = self._start_server()
            self.slots_server = self._start_server()
        except BaseException:
            self.close()  # the first server must not outlive a failed start of the second
            raise
        base = self.broker_server.url.rsplit("/", 1)[0]
        self.urls = {
            "broker": f"{base}/0",
            "probe": f"{base}/1",
            "dramatiq": f"{base}/2",
            # The result backend of scenario 10's canvas (chords need one); nothing else uses it.
            "results": f"{base}/3",
            "slots": self.slots_server.url,
        }
        self.plain_app = self.app(gated=False)
        self.gated_app = self.app(gated=True)

    def gate_home(self, layout: str = "separate") -> tuple[str, str]:
        """The Redis URL and the key prefix of the gates in ``layout`` (see :data:`LAYOUTS`).

        Raises:
            ValueError: ``layout`` is not one of :data:`LAYOUTS`.
        """
        if layout == "separate":
            return self.urls["slots"], self.prefix
        if layout in ("shared", "prefetch"):
            # The broker's own URL, database included: gates and queues side by side. A
            # prefix of their own keeps these gates apart from any other run's state.
            # "prefetch": the same, with semaphore_prefetch (see :meth:`prefetch_of`).
            return self.urls["broker"], f"{self.prefix}-{layout}"
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")

    def _start_server(self) -> PrivateRedis:
        server = start_private_redis()
        self._servers.append(server)
        return server

    def env(
        self, gated: bool = True, results: bool = False, layout: str = "separate"
    ) -> dict[str, str]:
        """The environment of a worker subprocess of this run (``results``: with the result
        backend; ``layout``: where its gates live, see :meth:`gate_home`)."""
        slots_url, prefix = self.gate_home(layout)
        env = dict(os.environ)
        env.update(
            BENCH_BROKER=self.urls["broker"],
            BENCH_SLOTS=slots_url,
            BENCH_PROBE=self.urls["probe"],
            BENCH_DRAMATIQ_BROKER=self.urls["dramatiq"],
            BENCH_PREFIX=prefix,
            BENCH_LIMIT=str(self.limit),
            BENCH_FREE_LIMIT=str(self.free_limit),
            BENCH_GATED="1" if gated else "0",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])),
        )
        if results:
            env["BENCH_RESULTS"] = self.urls["results"]
        env["BENCH_PREFETCH"] = str(self.prefetch_of(layout))
        return env

    def prefetch_of(self, layout: str) -> int:
        """``semaphore_prefetch`` of ``layout``: one call held ahead per unit of the limit."""
        return self.limit if layout == "prefetch" else 0

    def app(
        self,
        *,
        gated: bool,
        prefix: str | None = None,
        default_queue: str | None = None,
        layout: str = "separate",
    ) -> Celery:
        """A Celery app in this process configured like the workers of ``layout`` (or with
        another key prefix)."""
        slots_url, layout_prefix = self.gate_home(layout)
        return proj.create_app(
            broker_url=self.urls["broker"],
            slots_url=slots_url,
            probe_url=self.urls["probe"],
            prefix=prefix or layout_prefix,
            limit=self.limit,
            gated=gated,
            free_limit=self.free_limit,
            default_queue=default_queue,
            prefetch=self.prefetch_of(layout),
        )

    # -- workers ---------------------------------------------------------------------------

    def _spawn(
        self,
        name: str,
        args: list[str],
        gated: bool,
        kind: str,
        queue: str,
        results: bool = False,
        layout: str = "separate",
    ) -> Worker:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", *args],
                cwd=ROOT,
                env=self.env(gated, results, layout),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own process group, so stopping it also stops its pool children.
                start_new_session=True,
            )
        worker = Worker(name, queue, proc, log, kind)
        self.workers.append(worker)
        return worker

    def celery_worker(
        self,
        name: str,
        *,
        gated: bool,
        concurrency: int,
        pool: str,
        results: bool = False,
        layout: str = "separate",
    ) -> Worker:
        """Start ``celery worker`` on a queue of its own (not waiting for it: see :meth:`ready`);
        ``results``: with the result backend; ``layout``: where its gates live."""
        queue = f"{self.prefix}.{name}"
        args = [
            "celery", "-A", "benchmarks.proj", "worker", "-P", pool, "-c", str(concurrency),
            "-Q", queue, "-n", f"{name}@%h", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-l", "WARNING",
        ]  # fmt: skip
        return self._spawn(name, args, gated, "celery", queue, results, layout)

    def dramatiq_worker(self, name: str, *, concurrency: int) -> Worker:
        """Start a Dramatiq worker (one process, ``concurrency`` threads)."""
        # The same name as dramatiq_app.queue_name(), without importing Dramatiq here.
        queue = f"{self.prefix}-dramatiq"
        args = ["dramatiq", "benchmarks.dramatiq_app", "-p", "1", "-t", str(concurrency)]
        return self._spawn(name, [*args, "-Q", queue], True, "dramatiq", queue)

    def ready(self, workers: list[Worker], timeout: float = 90.0) -> None:
        """Wait until every Celery worker answers a ping.

        Raises:
            RuntimeError: a worker exited or did not answer in time.
        """
        waiting = {w.hostname: w for w in workers if w.kind == "celery"}
        deadline = time.monotonic() + timeout
        while waiting:
            for w in waiting.values():
                if not w.alive():
                    raise RuntimeError(f"worker {w.name} exited:\n{w.log_tail()}")
            replies = self.plain_app.control.ping(list(waiting), timeout=0.5) or []
            for reply in replies:
                for host in reply:
                    waiting.pop(host, None)
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"workers {sorted(waiting)} did not answer a ping")

    def pause(self, worker: Worker) -> None:
        """Stop ``worker`` consuming its queue, so a batch can be queued before it starts."""
        self._control(worker, "cancel_consumer")

    def resume(self, worker: Worker) -> None:
        """Let ``worker`` consume its queue again."""
        self._control(worker, "add_consumer")

    def _control(self, worker: Worker, command: str) -> None:
        for _ in range(5):
            replies = getattr(self.plain_app.control, command)(
                worker.queue, destination=[worker.hostname], reply=True, timeout=2.0
            )
            if replies:
                return
        raise RuntimeError(f"{worker.name} did not answer {command}:\n{worker.log_tail()}")

    def stop_worker(self, worker: Worker, timeout: float = 15.0) -> None:
        """Stop one worker: a warm shutdown, then SIGKILL of its process group."""
        if worker.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.pid, signal.SIGKILL)
                worker.proc.wait(10)
        if worker in self.workers:
            self.workers.remove(worker)

    def close(self) -> None:
        """Stop every worker and server this run started."""
        for worker in list(self.workers):
            with contextlib.suppress(Exception):
                self.stop_worker(worker, timeout=10.0)
        for server in self._servers:
            with contextlib.suppress(Exception):
                server.stop()
        self._servers.clear()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from ``/proc``; prefork children included)."""
    pids = [pid]
    for current in pids:
        for path in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids += [int(p) for p in path.read_text().split()]
    return pids


def memory_kib(pid: int, field: str = "Pss") -> int:
    """Memory of a worker in KiB: ``Pss`` summed over its processes, or a ``/proc/<pid>/status``
    field (``VmHWM``: peak RSS) taken from its largest process.

    Proportional set size is the honest sum for a prefork worker, whose children share their
    parent's pages; a peak exists only per process, so the peak is the largest process's.
    """
    values = []
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            name = "smaps_rollup" if field == "Pss" else "status"
            for line in Path(f"/proc/{p}/{name}").read_text().splitlines():
                if line.startswith(field + ":"):
                    values.append(int(line.split()[1]))
    if not values:
        return 0
    return sum(values) if field == "Pss" else max(values)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process and its live descendants, in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            # The command name (field 2) may contain spaces: count fields after its ')'.
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / ticks
