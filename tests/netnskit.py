"""A worker cut off from Redis: a network namespace joined to the root one by a veth pair,
redis-servers it reaches over that link, and the project its workers run.

- :class:`Netns` makes the namespace and the link (a private /30, ``10.200.x.1`` on the root
  side, ``.2`` inside), takes the link down and up, and removes both.
- :class:`BoundRedis` is a private redis-server listening on 127.0.0.1 and on the root side
  of the link: the test and the workers of the root namespace use the first address, the
  worker in the namespace the second, so only that worker loses it when the link goes down.
- :class:`Processes` starts ``celery -A tests.netnskit`` subprocesses, in the namespace or
  not, each in its own session, and kills them by process group.
- The module-level ``app`` (loaded by those workers when ``CS_NETNS=1``) is built from
  ``CS_*`` variables like ``tests.faultproj``'s, with tasks that log to a probe Redis. A
  task cut off from the probe keeps its events in memory and sends them once the link is
  back, each stamped with the moment it happened.

Importing this module outside such a worker builds an empty app and touches nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, signals

from celery_semaphore import current_fence, gated, holds_slot
from celery_semaphore.server import free_port, reachable

from .proj import base_app

__all__ = [
    "GATE",
    "BoundRedis",
    "Netns",
    "Probe",
    "Processes",
    "app",
    "app_from_env",
    "cut_off",
]

GATE = "work"
#: Timeout of every Redis call a task makes to the probe: a cut-off task must not hang on it.
PROBE_TIMEOUT_S = 0.5


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


class Netns:
    """A network namespace and a veth pair to it; :meth:`remove` undoes both.

    Raises (from the constructor): ``pytest.skip`` where namespaces are not permitted (the one
    ``ip netns add`` fails), ``subprocess.CalledProcessError`` on any later step.
    """

    def __init__(self) -> None:
        if shutil.which("ip") is None:
            pytest.skip("the partition test needs the ip command (iproute2)")
        tag = secrets.token_hex(3)
        self.name = f"cs-part-{tag}"
        self.host_if, self.ns_if = f"csh{tag}", f"csn{tag}"
        made = _ip("netns", "add", self.name, check=False)
        if made.returncode != 0:
            pytest.skip(
                f"network namespaces are not permitted here: `ip netns add` said "
                f"{made.stderr.strip() or made.returncode!r}"
            )
        self._veth = False
        try:
            self.host_ip, self.ns_ip = _free_block()
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            self._veth = True
            _ip("link", "set", self.ns_if, "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            self.run("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
            self.run("ip", "link", "set", self.ns_if, "up")
            self.run("ip", "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise

    def prefix(self) -> list[str]:
        """The command prefix that runs a program inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix(), *cmd], capture_output=True, text=True, check=True, timeout=10
        )

    def down(self) -> None:
        """Cut the link (its root-side end; the other end loses its carrier)."""
        _ip("link", "set", self.host_if, "down")

    def up(self) -> None:
        _ip("link", "set", self.host_if, "up")

    def remove(self) -> None:
        """Delete the veth pair and the namespace; safe to call twice."""
        if self._veth:
            _ip("link", "del", self.host_if, check=False)
            self._veth = False
        _ip("netns", "del", self.name, check=False)


def _free_block() -> tuple[str, str]:
    """Two addresses of a /30 in 10.200.0.0/16 that no interface uses."""
    used = _ip("-4", "-o", "addr", "show").stdout
    for _ in range(100):
        third, base = secrets.randbelow(256), 4 * secrets.randbelow(64)
        if (
            f" 10.200.{third}.{base + 1}/" not in used
            and f" 10.200.{third}.{base + 2}/" not in used
        ):
            return f"10.200.{third}.{base + 1}", f"10.200.{third}.{base + 2}"
    raise RuntimeError("no free /30 in 10.200.0.0/16")


class BoundRedis:
    """A private redis-server on 127.0.0.1 and ``host_ip`` (the root side of the link)."""

    def __init__(self, host_ip: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("the partition test needs redis-server on PATH")
        self.port = free_port()
        self.host_ip = host_ip
        self.workdir = tempfile.mkdtemp(prefix="celery-semaphore-netns-")
        self.process = subprocess.Popen(
            [
                binary, "--port", str(self.port), "--bind", "127.0.0.1", host_ip,
                "--protected-mode", "no", "--save", "", "--appendonly", "no",
                "--dir", self.workdir, "--daemonize", "no", "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not reachable(self.url(0)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on {host_ip}:{self.port}")
            time.sleep(0.02)

    def url(self, db: int, *, inside: bool = False) -> str:
        """The URL of database ``db``, as seen from the root namespace or from ``inside``."""
        host = self.host_ip if inside else "127.0.0.1"
        return f"redis://{host}:{self.port}/{db}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)


class Processes:
    """``celery -A tests.netnskit`` subprocesses of one test; all killed by :meth:`stop_all`."""

    def __init__(self, root: Path, logs: Path) -> None:
        self.root = root
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def worker(
        self,
        name: str,
        env: dict[str, str],
        queue: str,
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        netns: Netns | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a worker of ``queue`` (inside ``netns`` when given); not waited for."""
        cmd = [
            sys.executable, "-m", "celery", "-A", "tests.netnskit", "worker", "-P", pool,
            "-c", str(concurrency), "-n", f"{name}@%h", "-Q", queue, "--without-gossip",
            "--without-mingle", "--without-heartbeat", "-l", "WARNING",
        ]  # fmt: skip
        if netns is not None:
            cmd = [*netns.prefix(), *cmd]
        with open(self.logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                cmd, cwd=self.root, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def output(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


# -- the project its workers run ---------------------------------------------------------------


class Probe:
    """The event log of one test, in the probe database; a cut-off process keeps its events
    until it reaches the probe again (each stamped with the moment it happened)."""

    def __init__(self, url: str, prefix: str) -> None:
        self.client = redis.Redis.from_url(
            url, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S
        )
        self.prefix = prefix
        self._pending: list[str] = []

    def key(self, name: str) -> str:
        return f"nprobe:{self.prefix}:{name}"

    def record(self, event: str, task_id: str, **fields: Any) -> None:
        entry = {"ev": event, "id": task_id, "t": time.time(), "pid": os.getpid(), **fields}
        self._pending.append(json.dumps(entry))
        self.flush()

    def flush(self) -> bool:
        """Send the events kept so far; whether they all went."""
        if self._pending:
            try:
                self.client.rpush(self.key("log"), *self._pending)
            except redis.RedisError:
                return False
            self._pending.clear()
        return True

    def events(self, event: str | None = None, task_id: str | None = None) -> list[dict[str, Any]]:
        """Events in the order they happened. A push that timed out may still have reached
        Redis once the link came back and then been sent again: duplicates are dropped."""
        raw = dict.fromkeys(self.client.lrange(self.key("log"), 0, -1))
        rows = sorted((json.loads(r) for r in raw), key=lambda r: r["t"])
        return [
            r
            for r in rows
            if (event is None or r["ev"] == event) and (task_id is None or r["id"] == task_id)
        ]

    def set_flag(self, name: str) -> None:
        self.client.set(self.key(f"flag:{name}"), 1)

    def flag(self, name: str) -> bool:
        """Whether the test set ``name``; ``False`` while the probe cannot be reached."""
        try:
            return bool(self.client.exists(self.key(f"flag:{name}")))
        except redis.RedisError:
            return False


def _holds() -> dict[str, Any]:
    """When ``holds_slot()`` was asked, and its answer or the name of the error it raised."""
    asked = time.time()
    try:
        return {"asked": asked, "holds": holds_slot()}
    except Exception as exc:  # the gates' Redis is cut off
        return {"asked": asked, "holds": f"error: {type(exc).__name__}"}


def app_from_env(env: dict[str, str] | os._Environ[str]) -> Celery:
    """The app of the partition test from ``CS_*`` variables: gate ``work`` of size
    ``CS_LIMIT``, lease ``CS_LEASE``, tick ``CS_TICK``; the probe in ``CS_PROBE``."""
    app = base_app(
        "netnskit",
        broker=env["CS_BROKER"],
        backend=env["CS_BACKEND"],
        slots_url=env["CS_SLOTS"],
        prefix=env["CS_PREFIX"],
        queue=env["CS_QUEUE"],
        limit=int(env.get("CS_LIMIT", "1")),
        semaphore_lease=float(env["CS_LEASE"]),
        semaphore_tick_interval=float(env["CS_TICK"]),
        # Calls to the gates' Redis fail in a second while it is cut off, not after five.
        semaphore_redis_timeout=float(env.get("CS_REDIS_TIMEOUT", "1.0")),
        worker_prefetch_multiplier=1,
    )
    probe = Probe(env["CS_PROBE"], env["CS_PREFIX"])
    app.probe = probe  # type: ignore[attr-defined]

    @gated(GATE)
    @app.task(name="part.hold", bind=True, shared=False)
    def hold(self: Any, flag: str, max_s: float = 40.0) -> dict[str, Any]:
        """Hold the gate until the test sets ``flag``, asking ``holds_slot()`` all along."""
        task_id = self.request.id
        probe.record("start", task_id, fence=current_fence())
        deadline = time.monotonic() + max_s
        try:
            while not probe.flag(flag) and time.monotonic() < deadline:
                probe.record("check", task_id, **_holds())
                time.sleep(0.1)
            probe.record("check", task_id, **_holds())
        finally:
            probe.record("end", task_id)
        return {"fence": current_fence()}

    @gated(GATE)
    @app.task(name="part.sleep", bind=True, shared=False)
    def sleep(self: Any, ms: float = 20) -> float:
        probe.record("start", self.request.id, fence=current_fence())
        try:
            time.sleep(ms / 1000.0)
        finally:
            probe.record("end", self.request.id)
        return ms

    def on_postrun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
        # Connected after the package's receivers: it follows the release of the run.
        if task is not None and task.app is app and task.name.startswith("part."):
            probe.record("postrun", task_id or "")

    signals.task_postrun.connect(on_postrun, weak=False, dispatch_uid=f"netnskit.{id(app)}")
    return app


app = app_from_env(os.environ) if os.environ.get("CS_NETNS") == "1" else Celery("netnskit-none")


@contextlib.contextmanager
def cut_off() -> Iterator[Netns]:
    """A namespace and its link for the block; removed afterwards, whatever happened."""
    ns = Netns()
    try:
        yield ns
    finally:
        ns.remove()
