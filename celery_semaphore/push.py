"""Broker push: where the broker is the gates' Redis, a grant puts the message in its queue.

The common deployment keeps broker and gates in one Redis. There the script that grants a
call can also push its message into the broker's queue list, in the same atomic step: a
submit is one round trip, and a call handed room at another's end starts without the
releasing worker publishing anything (see lua/common.lua, ``handed``).

What is pushed is exactly what kombu's Redis transport would ``LPUSH``: the message is sent
through Celery's own producer with a collecting publish batch (kombu's batch interface), so
routing, priorities, ``global_keyprefix`` and the message format stay kombu's. Anything else
(another broker, another server or database, a Sentinel or Cluster client, a queue with
``x-expires``, a fanout exchange) keeps the ordinary publish.

The stored form is ``kombu\\x1f<list key>\\x1f<payload>``. The payload's headers start with
``semaphore_handoff: "0"``, which the script turns into ``"1"`` (and follows with the inputs
of a workflow node) when the message is pushed at a hand-off rather than at its submit.
"""

from __future__ import annotations

import threading
from typing import Any

from celery.utils.log import get_logger
from kombu.utils import json

__all__ = ["HANDOFF_HEADER", "MARK", "PUSH_PREFIX", "broker_is_gates", "capture", "unpack"]

logger = get_logger(__name__)

#: Start of a stored message that a script pushes itself.
PUSH_PREFIX = b"kombu\x1f"
#: Header added to a message published from Redis after it was handed room (not at submit).
HANDOFF_HEADER = "semaphore_handoff"
#: Where the scripts mark a hand-off in a payload (the first header, see lua/common.lua).
MARK = f'"headers": {{"{HANDOFF_HEADER}": "0"'.encode()
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def _host(value: Any) -> str:
    host = str(value or "127.0.0.1")
    return "127.0.0.1" if host in _LOOPBACK else host


def broker_is_gates(app: Any, client: Any) -> bool:
    """Whether ``app``'s broker is the Redis server and database of the gates' ``client``."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    if not kwargs or "host" not in kwargs or "path" in kwargs:
        return False  # a Cluster or Sentinel client, or a unix socket: not compared
    try:
        conn = app.connection_for_write()
    except Exception:  # an unparsable broker URL: Celery reports it when it publishes
        return False
    try:
        if str(conn.transport_cls) not in ("redis", "rediss") or conn.alt[1:]:
            return False
        vhost = str(conn.virtual_host or "0").strip("/") or "0"
        return (
            _host(conn.hostname) == _host(kwargs.get("host"))
            and int(conn.port or 6379) == int(kwargs.get("port") or 6379)
            and vhost.isdigit()
            and int(vhost) == int(kwargs.get("db") or 0)
        )
    finally:
        conn.release()


class _Collector:
    """A kombu publish batch that keeps the Redis commands instead of running them."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[Any, ...]]] = []

    def publish(self, channel: Any, message: Any, **kwargs: Any) -> None:
        self.channel = channel
        channel.basic_publish(message, _publish_batch=self, **kwargs)

    def add(self, name: str, *args: Any) -> None:
        self.commands.append((name, args))


_no_batch = threading.local()


def capture(producer: Any, envelope: Any) -> bytes | None:
    """The stored push form of ``envelope`` as ``producer`` would publish it, or ``None``
    when it is not a single ``LPUSH`` (then the message is published as usual)."""
    batch_local = getattr(producer, "_batch_local", _no_batch)
    if batch_local is _no_batch or getattr(batch_local, "current", None) is not None:
        return None  # an older kombu, or the caller's own batch: publish as usual
    kwargs = dict(envelope.publish_kwargs)
    headers = {k: v for k, v in (kwargs.get("headers") or {}).items() if k != HANDOFF_HEADER}
    kwargs["headers"] = {HANDOFF_HEADER: "0", **headers}
    collector = _Collector()
    batch_local.current = collector
    try:
        producer.publish(
            envelope.data,
            content_type=envelope.content_type,
            content_encoding=envelope.content_encoding,
            declare=envelope.declare,
            **kwargs,
        )
    finally:
        del batch_local.current
    if len(collector.commands) != 1 or collector.commands[0][0] != "lpush":
        return None
    key, payload = collector.commands[0][1]
    data = payload.encode() if isinstance(payload, str) else bytes(payload)
    at = data.find(b'"headers"')
    if at < 0 or data.find(MARK) != at:
        return None  # not the layout the scripts expect: never guess
    prefix = getattr(getattr(collector, "channel", None), "global_keyprefix", "") or ""
    return PUSH_PREFIX + f"{prefix}{key}".encode() + b"\x1f" + data


def unpack(raw: bytes) -> tuple[str, dict[str, Any]]:
    """The list key and the kombu message of a stored push form.

    Raises:
        ValueError: it is not one.
    """
    if not raw.startswith(PUSH_PREFIX):
        raise ValueError("not a pushed message")
    key, sep, payload = raw[len(PUSH_PREFIX) :].partition(b"\x1f")
    if not sep:
        raise ValueError("a pushed message without its queue")
    message = json.loads(payload)
    if not isinstance(message, dict):
        raise ValueError("a pushed message that is not a kombu message")
    return key.decode(), message
