"""A real local Redis Cluster for the tests: three masters and one replica each.

Six ``redis-server --cluster-enabled yes`` processes on free loopback ports (no persistence,
a short ``cluster-node-timeout`` so a killed master's replica takes over in a few seconds),
joined with ``redis-cli --cluster create ... --cluster-replicas 1``. The session fixture
:func:`redis_cluster_fixture` starts one per test session in a temporary directory and kills
every process at the end, even when a test or the start itself failed. A test that kills a
node calls :meth:`LocalCluster.heal` when done, which restarts it (it rejoins as a replica),
or builds a new cluster when its port was taken meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from celery_semaphore.server import free_port

__all__ = ["LocalCluster", "Node", "cluster_unavailable", "redis_cluster_fixture"]

#: How long a master may be silent before the cluster fails it over (redis.conf default 15 s).
NODE_TIMEOUT_MS = 1000
#: The cluster bus of a node listens on its port + 10000 (fixed in Redis 6.2).
BUS_OFFSET = 10000


def cluster_unavailable() -> str | None:
    """Why no local cluster can be started here, or ``None`` when one can."""
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            return f"the Redis Cluster tests need {binary} on PATH"
    # `redis-cli --cluster help` exits 1 after printing the help; a redis-cli older than 5.0
    # does not know the option at all.
    out = subprocess.run(
        ["redis-cli", "--cluster", "help"], capture_output=True, text=True, timeout=10
    )
    if "create" not in out.stdout + out.stderr:
        return "this redis-cli has no --cluster create (Redis 5.0 or later is needed)"
    return None


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Ports that are free, and whose cluster bus port (+10000) is free and valid too."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port + BUS_OFFSET <= 65535 and port not in ports and _bindable(port + BUS_OFFSET):
            ports.append(port)
    return ports


@dataclasses.dataclass
class Node:
    """One redis-server of the cluster."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout: float = 1.0) -> redis.Redis:
        """A plain client of this node alone (no redirections followed, no retries: the
        callers poll)."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as c:
            return c.info(section)  # type: ignore[no-any-return]

    def cluster_info(self) -> dict[str, str]:
        with self.client() as c:
            raw = c.execute_command("CLUSTER", "INFO")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        if isinstance(raw, dict):
            return {str(k): str(v) for k, v in raw.items()}
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def role(self) -> str:
        """``master`` or ``slave`` (as Redis says it), ``""`` when it does not answer."""
        try:
            return str(self.info("replication")["role"])
        except (redis.RedisError, OSError):
            return ""

    def start(self, node_timeout_ms: int) -> None:
        """Start the server (again): a restart keeps its nodes.conf, so it rejoins."""
        log = open(self.workdir / "server.log", "ab")  # noqa: SIM115  closed below
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                # A replica whose link broke just now still takes over.
                "--cluster-replica-validity-factor", "0",
                "--save", "", "--appendonly", "no",
                "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
                "--daemonize", "no", "--loglevel", "notice",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log.close()

    def kill(self) -> float:
        """SIGKILL the server (no shutdown, no last replication); returns when (time.time())."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        at = time.time()
        self.proc.wait(10)
        return at

    def ping(self) -> bool:
        try:
            with self.client(0.3) as c:
                return bool(c.ping())
        except (redis.RedisError, OSError):
            return False


class LocalCluster:
    """Three masters with ``replicas`` replica(s) each on loopback, in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
    ) -> None:
        self.workdir = workdir
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        ports = _free_ports(masters * (1 + replicas))
        self.nodes = [Node(p, workdir / str(p)) for p in ports]

    # -- life cycle --------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start every node, create the cluster, and wait until it serves every slot."""
        began = time.monotonic()
        for node in self.nodes:
            self._launch(node)
        create = subprocess.run(
            [
                "redis-cli", "--cluster", "create", *(n.addr for n in self.nodes),
                "--cluster-replicas", str(self.replicas), "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )  # fmt: skip
        (self.workdir / "create.log").write_text(create.stdout + create.stderr)
        if create.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed:\n{create.stdout}{create.stderr}"
            )
        self.wait_ok(timeout - (time.monotonic() - began))

    def _launch(self, node: Node, attempts: int = 5) -> None:
        """Start a new node; another port when its own was taken since it was chosen (other
        processes of the machine pick free ports too)."""
        for _ in range(attempts):
            node.workdir.mkdir(parents=True, exist_ok=True)
            node.start(self.node_timeout_ms)
            if self._answers(node):
                return
            taken = {n.port for n in self.nodes}
            node.port = next(p for p in _free_ports(len(taken) + 1) if p not in taken)
            node.workdir = self.workdir / str(node.port)
        raise RuntimeError(f"no redis-server would start; see {node.workdir}/server.log")

    def _answers(self, node: Node, timeout: float = 10.0) -> bool:
        """Whether ``node`` answers a ping before it exits (a port taken) or ``timeout``."""
        deadline = time.monotonic() + timeout
        while node.alive() and time.monotonic() < deadline:
            if node.ping():
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Kill every node this cluster started (by its own process group) and wait for it."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGKILL)
            if node.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(10)

    def heal(self, timeout: float = 30.0) -> None:
        """Restart the nodes a test killed (each rejoins as a replica) and wait until every
        node is up, every slot served and every replica in sync; when that fails (a port
        taken meanwhile), build a new cluster on new ports instead."""
        try:
            for node in self.nodes:
                if not node.alive():
                    node.start(self.node_timeout_ms)
                    if not self._answers(node):
                        raise RuntimeError(f"redis-server on port {node.port} did not restart")
            self.wait_ok(timeout)
        except (RuntimeError, TimeoutError):
            self.stop()
            self.workdir = self.workdir.with_name(self.workdir.name + "-again")
            ports = _free_ports(len(self.nodes))
            self.nodes = [Node(p, self.workdir / str(p)) for p in ports]
            self.start()

    # -- state -------------------------------------------------------------------------------

    def url(self, form: str = "seed") -> str:
        """``semaphore_redis_url`` of this cluster, in one of the spellings connect.py takes:
        ``"seed"`` one node (``redis+cluster://h:p``; the client finds the others), ``"seeds"``
        two nodes (``redis+cluster://h1:p1,h2:p2``), ``"node"`` a plain ``redis://h:p`` that
        needs ``semaphore_redis_cluster = True``."""
        first = self.nodes[0].addr
        if form == "seeds":
            return "redis+cluster://" + ",".join(n.addr for n in self.nodes[:2])
        return f"redis+cluster://{first}" if form == "seed" else f"redis://{first}"

    def client(self) -> RedisCluster:
        """A new cluster client (the caller closes it)."""
        live = [n for n in self.nodes if n.alive()]
        return RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode("127.0.0.1", n.port) for n in live],
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
        )

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def topology(self) -> dict[int, list[int]]:
        """``{master port: [its replicas' ports]}`` as a live node sees it now."""
        for node in self.nodes:
            if not node.alive():
                continue
            try:
                with node.client() as c:
                    raw = c.execute_command("CLUSTER", "NODES")
            except (redis.RedisError, OSError):
                continue
            return _parse_nodes(raw.decode() if isinstance(raw, bytes) else str(raw))
        raise RuntimeError("no node of the cluster answers")

    def master_of(self, key: str) -> Node:
        """The node that serves ``key`` now (asked of the cluster, not computed here)."""
        for node in self.nodes:
            if not node.alive():
                continue
            try:
                with node.client() as c:
                    slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
                    for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                        if int(start) <= slot <= int(end):
                            return self.node(int(master[1]))
            except (redis.RedisError, OSError):
                continue
        raise RuntimeError(f"no live node knows who serves {key!r}")

    def replica_of(self, master: Node) -> Node:
        return self.node(self.topology()[master.port][0])

    def healthy(self) -> bool:
        """Every node up and agreeing the cluster is ok; every master with its replicas linked."""
        try:
            if not all(n.alive() for n in self.nodes):
                return False
            for node in self.nodes:
                info = node.cluster_info()
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                    return False
                if int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                    return False
            shape = self.topology()
            if len(shape) != self.masters or any(len(r) != self.replicas for r in shape.values()):
                return False
            replicas = [self.node(p) for ports in shape.values() for p in ports]
            return all(r.info("replication").get("master_link_status") == "up" for r in replicas)
        except (redis.RedisError, OSError):
            return False

    def wait_ok(self, timeout: float = 30.0) -> None:
        self._wait(self.healthy, timeout, "the Redis Cluster to be ok with every replica in sync")

    def wait_promoted(self, replica: Node, timeout: float = 30.0) -> float:
        """Wait until ``replica`` is a master and the live nodes say the cluster is ok again;
        returns when (time.time())."""

        def promoted() -> bool:
            if replica.role() != "master":
                return False
            try:
                return all(
                    n.cluster_info().get("cluster_state") == "ok" for n in self.nodes if n.alive()
                )
            except (redis.RedisError, OSError):
                return False

        self._wait(promoted, timeout, f"replica {replica.addr} to be promoted", step=0.01)
        return time.time()

    def cut_replication(self, master: Node, replica: Node) -> None:
        """Stop ``replica`` from receiving ``master``'s writes: from now on it lags behind,
        as a replica over a slow link would. Its next attempts to reconnect fail to
        authenticate (a wrong ``masterauth``) until :meth:`mend_replication`."""
        with replica.client() as r:
            r.config_set("masterauth", "not-the-password")
        with master.client() as m:
            m.execute_command("CLIENT", "KILL", "TYPE", "slave")
        self._wait(
            lambda: (
                replica.info("replication").get("master_link_status") != "up"
                and int(master.info("replication").get("connected_slaves", 0)) == 0
            ),
            5,
            f"replica {replica.addr} to lose its link",
            step=0.005,
        )

    def mend_replication(self, replica: Node) -> None:
        with replica.client() as r:
            r.config_set("masterauth", "")

    def _wait(self, predicate: Any, timeout: float, what: str, step: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(step)


def _parse_nodes(text: str) -> dict[int, list[int]]:
    """``CLUSTER NODES`` -> ``{master port: [replica ports]}`` (nodes marked fail left out)."""
    ids: dict[str, int] = {}
    rows = []
    for line in text.splitlines():
        node_id, addr, flags, master_id, *_ = line.split()
        port = int(addr.split("@", 1)[0].rsplit(":", 1)[1])
        ids[node_id] = port
        rows.append((port, set(flags.split(",")), master_id))
    shape: dict[int, list[int]] = {}
    for port, flags, _ in rows:
        if "master" in flags and "fail" not in flags:
            shape.setdefault(port, [])
    for port, flags, master_id in rows:
        if "slave" in flags and "fail" not in flags and ids.get(master_id) in shape:
            shape[ids[master_id]].append(port)
    return shape


@pytest.fixture(name="redis_cluster", scope="session")
def redis_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A local Redis Cluster for the test session (skips where none can be started)."""
    reason = cluster_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
