"""A local Sentinel deployment for the tests: one master, one replica, three sentinels.

Every server is a ``redis-server`` on a free loopback port, started in its own session with
its files in a directory of its own; ``redis-server --sentinel`` stands in for
``redis-sentinel``. Sentinels declare the master down after ``DOWN_AFTER_MS`` and may retry a
failover after ``FAILOVER_TIMEOUT_MS``, so a killed master is replaced in a few seconds.
:meth:`Deployment.stop` kills every process, and the fixture calls it even when the test
fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.sentinel import MasterNotFoundError, Sentinel

from celery_semaphore.server import free_port

__all__ = [
    "DOWN_AFTER_MS",
    "FAILOVER_TIMEOUT_MS",
    "MASTER",
    "Deployment",
    "Server",
    "sentinels_fixture",
]

#: The name the sentinels know the master by.
MASTER = "mymaster"
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 3000


@dataclasses.dataclass
class Server:
    """A redis-server (or sentinel) process this test started."""

    role: str
    port: int
    proc: subprocess.Popen[bytes]
    folder: Path
    password: str | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis("127.0.0.1", self.port, password=self.password, socket_timeout=timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crashed host would go: nothing flushed, nothing said to anyone."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def freeze(self) -> None:
        """SIGSTOP, as a hung host or a partition looks: connections open, no answer."""
        self.proc.send_signal(signal.SIGSTOP)

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Deployment:
    """A master, its replica and three sentinels watching them, all on loopback.

    Args:
        workdir: where every server keeps its configuration, log and (no) data.
        password: ``requirepass`` of the master and the replica, if any.
        sentinel_password: ``requirepass`` of the sentinels, if any.
    """

    def __init__(
        self, workdir: Path, password: str | None = None, sentinel_password: str | None = None
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not on PATH (Sentinel needs a real server)")
        self.binary = binary
        self.workdir = workdir
        self.password = password
        self.sentinel_password = sentinel_password
        #: Every process started, for :meth:`stop`.
        self.servers: list[Server] = []
        self.sentinels: list[Server] = []

    def start(self) -> None:
        """Start the master, its replica and the sentinels (see :meth:`ready`)."""
        self.master = self._start("master")
        self.replica = self._start("replica", replica_of=self.master)
        self.sentinels = [self._start_sentinel(i) for i in range(3)]

    @property
    def url(self) -> str:
        """``semaphore_redis_url`` of the master (kombu's spelling of several hosts)."""
        hosts = ";".join(s.address for s in self.sentinels)
        options = {"password": self.password, "sentinel_password": self.sentinel_password}
        query = "&".join(f"{k}={v}" for k, v in options.items() if v)
        return f"sentinel://{hosts}/{MASTER}" + (f"?{query}" if query else "")

    def _spawn(self, role: str, port: int, argv: list[str], password: str | None) -> Server:
        folder = self.workdir / f"{role}-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            argv,
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        server = Server(role, port, proc, folder, password)
        self.servers.append(server)
        return server

    def _start(self, role: str, replica_of: Server | None = None) -> Server:
        port = free_port()
        folder = self.workdir / f"{role}-{port}"
        argv = [
            self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(folder), "--logfile", "server.log",
            "--daemonize", "no",
        ]  # fmt: skip
        if self.password:
            argv += ["--requirepass", self.password, "--masterauth", self.password]
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(replica_of.port)]
        server = self._spawn(role, port, argv, self.password)
        self._wait(lambda: server.client(0.5).ping(), f"{role} on port {port}", server)
        return server

    def _start_sentinel(self, index: int) -> Server:
        port = free_port()
        folder = self.workdir / f"sentinel-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        # Sentinel rewrites its configuration file: it must be a file of its own.
        conf = folder / "sentinel.conf"
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            f"dir {folder}",
            "logfile server.log",
            f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 2",
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {MASTER} {self.password}")
        if self.sentinel_password:
            # Its own password, and the one it gives its peers (the same for all three).
            lines += [f"requirepass {self.sentinel_password}"]
            lines += [f"sentinel sentinel-pass {self.sentinel_password}"]
        conf.write_text("\n".join(lines) + "\n")
        argv = [self.binary, str(conf), "--sentinel"]
        server = self._spawn("sentinel", port, argv, self.sentinel_password)
        self._wait(lambda: server.client(0.5).ping(), f"sentinel {index}", server)
        return server

    def _wait(
        self, predicate: Any, what: str, server: Server | None = None, timeout: float = 20.0
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.RedisError, OSError):
                value = predicate()
                if value:
                    return value
            if server is not None and not server.alive():
                raise RuntimeError(f"{what} exited:\n{server.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.05)

    def ready(self, timeout: float = 20.0) -> None:
        """Wait until the replica is in sync and every sentinel knows the replica and the
        other two sentinels (a failover needs a majority of them to agree)."""

        def synced() -> bool:
            info = self.replica.client().info("replication")
            return info.get("master_link_status") == "up"

        self._wait(synced, "the replica to sync", timeout=timeout)
        for sentinel in self.sentinels:

            def knows_all(s: Server = sentinel) -> bool:
                state = s.client().sentinel_master(MASTER)
                return state["num-other-sentinels"] == 2 and state["num-slaves"] == 1

            self._wait(knows_all, f"sentinel {sentinel.port} to know its peers", timeout=timeout)

    def sync(self, timeout_ms: int = 5000) -> bool:
        """Whether the replica applied everything the master wrote so far (a write, then
        ``WAIT``: WAIT counts from the offset of the connection's own last write)."""
        client = self.master.client()
        client.incr("sentinelkit:sync")
        return bool(client.wait(1, timeout_ms) >= 1)

    @contextlib.contextmanager
    def stalled_replication(self) -> Iterator[None]:
        """Inside the block the replica applies nothing of the master's stream.

        ``CLIENT PAUSE WRITE`` on the replica postpones every write, the master's link
        included, while it still answers the sentinels' PING and INFO (so it stays eligible
        for promotion). Whatever the master writes meanwhile waits, unapplied, in the replica's
        buffer; if the master dies inside the block, the replica drops that buffer when it
        sees the link go down, so the block ends only once it has. (A replica stopped with
        SIGSTOP or DEBUG SLEEP would not do: the kernel keeps the stream in its socket buffer
        and the replica applies it when it resumes.)
        """
        replica = self.replica.client()
        replica.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
        try:
            yield
            if not self.master.alive():
                self._wait(
                    lambda: replica.info("replication")["master_link_status"] == "down",
                    "the replica to see its master gone",
                )
        finally:
            replica.execute_command("CLIENT", "UNPAUSE")

    def add_replica(self) -> Server:
        """Start a new replica of the current master and wait until it is in sync."""
        self.replica = self._start("replica", replica_of=self.master)
        self._wait(
            lambda: self.replica.client().info("replication")["master_link_status"] == "up",
            "the new replica to sync",
        )
        return self.replica

    def server_at(self, port: int) -> Server:
        return next(s for s in self.servers if s.port == port and s.role != "sentinel")

    def kill_master(self) -> Server:
        """SIGKILL the master; returns it."""
        self.master.kill()
        return self.master

    def freeze_master(self) -> Server:
        """SIGSTOP the master (it is killed at the end); returns it."""
        self.master.freeze()
        return self.master

    def wait_failover(self, old: Server, timeout: float = 20.0) -> Server:
        """Wait until clients find a new master, as redis-py's Sentinel client does (a sentinel
        that names it and sees it up), and it accepts writes; return it."""
        finder = Sentinel(
            [("127.0.0.1", s.port) for s in self.sentinels if s.alive()],
            sentinel_kwargs={"password": self.sentinel_password, "socket_timeout": 0.5},
        )

        def promoted() -> Server | None:
            try:
                _, port = finder.discover_master(MASTER)
            except MasterNotFoundError:
                return None
            if int(port) == old.port:
                return None
            new = self.server_at(int(port))
            if new.client(0.5).info("replication")["role"] != "master":
                return None
            return new

        new: Server = self._wait(promoted, "a new master", timeout=timeout)
        self.master = new
        return new

    def stop(self) -> None:
        """Kill every server; then nothing of this deployment runs."""
        for server in reversed(self.servers):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                if server.alive():
                    # A stopped process (SIGSTOP) dies of SIGKILL as well.
                    server.proc.send_signal(signal.SIGKILL)
                server.proc.wait(10)


@pytest.fixture(name="sentinels")
def sentinels_fixture(tmp_path: Path) -> Iterator[Deployment]:
    """A fresh master, replica and three sentinels for this test, ready to fail over."""
    deployment = Deployment(tmp_path)
    try:
        deployment.start()
        deployment.ready()
        yield deployment
    finally:
        deployment.stop()
