"""A group's scripts sent as EVALSHA commands encoded once: only the arguments per call.

redis-py encodes every argument of every command (a group's scripts take 23 keys), and
that packing was the largest client cost of a gated call: about a third of the worker's
CPU per script, measured with cProfile (see benchmarks/README.md, Profile). Here the
command's head (EVALSHA, the script's SHA, the keys) is encoded once per group, and a call
appends its few arguments and runs on a pooled connection, one attempt, as redis-py would
with the client's settings (its timeouts, no retry). A Redis Cluster client has no single
pool: it keeps redis-py's own path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.commands.core import Script

__all__ = ["ScriptCall"]


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _encode(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()


class ScriptCall:
    """One script bound to one group's keys, callable with the script's arguments."""

    __slots__ = ("_count", "_head", "_keys", "client", "pool", "script")

    def __init__(self, client: Any, script: Script, keys: Sequence[str]) -> None:
        self.client = client
        self.script = script
        self._keys = tuple(keys)
        #: ``None`` for a Redis Cluster client (redis-py routes its commands itself).
        self.pool = getattr(client, "connection_pool", None)
        head = [b"EVALSHA", script.sha.encode(), str(len(keys)).encode()]
        head += [k.encode() for k in keys]
        self._head = b"".join(_bulk(x) for x in head)
        self._count = len(head)

    def _pack(self, args: Sequence[Any]) -> bytes:
        encoded = [_encode(a) for a in args]
        return b"".join(
            [b"*%d\r\n" % (self._count + len(encoded)), self._head] + [_bulk(a) for a in encoded]
        )

    def send(self, args: Sequence[Any]) -> Any:
        """Send the script without waiting for its answer; returns the connection to read it
        from with :meth:`receive` (which gives the connection back). Single-server clients
        only (``self.pool`` is set)."""
        return self._put(self._pack(args))

    def _put(self, data: bytes) -> Any:
        pool = self.pool
        assert pool is not None
        # The pool's checkout is the health check: it reconnects a connection whose server
        # went away (restarted, failed over) before anything is sent on it.
        conn = pool.get_connection()
        try:
            conn.send_packed_command([data], check_health=False)
        except BaseException:
            conn.disconnect()
            pool.release(conn)
            raise
        return conn

    def receive(self, conn: Any) -> Any:
        """The answer of a script :meth:`send` sent on ``conn``; raises what redis-py raises
        (NoScriptError included: then the script did not run)."""
        pool = self.pool
        assert pool is not None
        try:
            return conn.read_response()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            # The reply may still be on its way: this connection must not serve another call.
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def __call__(self, args: Sequence[Any]) -> Any:
        """Run the script with ``args``; raises what redis-py raises (ConnectionError,
        TimeoutError, ResponseError), loading the script once when Redis answers NOSCRIPT."""
        if self.pool is None:
            return self.script(keys=self._keys, args=args)
        data = self._pack(args)
        try:
            return self._send(data)
        except redis.exceptions.NoScriptError:
            # A restarted or flushed server: load it, then run it once more.
            self.client.script_load(self.script.script)
            return self._send(data)

    def _send(self, data: bytes) -> Any:
        return self.receive(self._put(data))
