"""A task message as celery_semaphore parks it: serialized once, published later as is.

Celery builds and routes the message; :class:`CapturingProducer` stands in for kombu's
producer for the one ``publish`` of the task, so the message can be gated (published now,
or parked in Redis) without re-implementing Celery's routing. The parked form keeps the
body exactly as serialized for the caller, so a worker that publishes it later needs
neither the task's arguments in memory nor the caller's serializer settings.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from kombu import Exchange
from kombu.serialization import dumps
from kombu.utils import json

from .push import HANDOFF_HEADER, PUSH_PREFIX, unpack

__all__ = ["CapturingProducer", "Envelope"]

# Publish keyword arguments that cannot be stored as they are.
_DROPPED = ("serializer", "producer", "connection")


class Envelope:
    """A serialized task message plus the ``Producer.publish`` arguments Celery chose."""

    __slots__ = ("content_encoding", "content_type", "data", "declare", "publish_kwargs", "queues")

    def __init__(
        self,
        data: bytes | str,
        content_type: str,
        content_encoding: str,
        publish_kwargs: dict[str, Any],
        queues: list[str],
    ) -> None:
        self.data = data
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.publish_kwargs = publish_kwargs
        self.queues = queues
        #: The caller's kombu Queue objects, when the envelope was built in this process.
        self.declare: list[Any] = []

    @classmethod
    def from_publish(cls, body: Any, kwargs: dict[str, Any]) -> Envelope:
        """Serialize ``body`` the way kombu would; raises kombu's EncodeError when it cannot."""
        kw = {k: v for k, v in kwargs.items() if k not in _DROPPED}
        content_type, content_encoding, data = dumps(body, serializer=kwargs.get("serializer"))
        exchange = kw.get("exchange")
        if isinstance(exchange, Exchange):
            kw["exchange"] = exchange.name
        declare = kw.pop("declare", None) or []
        queues = [q.name for q in declare if getattr(q, "name", None)]
        envelope = cls(data, content_type, content_encoding, kw, queues)
        envelope.declare = list(declare)
        return envelope

    def encode(self) -> bytes:
        """Return the form stored in Redis."""
        binary = isinstance(self.data, bytes)
        data = base64.b64encode(self.data).decode() if isinstance(self.data, bytes) else self.data
        return json.dumps(
            {
                "v": 1,
                "data": data,
                "b64": binary,
                "ct": self.content_type,
                "ce": self.content_encoding,
                "kw": self.publish_kwargs,
                "q": self.queues,
            }
        ).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> Envelope:
        """Rebuild an envelope from its stored form; raises ValueError when it is malformed."""
        if isinstance(raw, bytes) and raw.startswith(PUSH_PREFIX):
            return cls._from_pushed(raw)
        try:
            doc = json.loads(raw)
            data = base64.b64decode(doc["data"]) if doc["b64"] else doc["data"]
            return cls(data, doc["ct"], doc["ce"], dict(doc["kw"]), list(doc["q"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed parked message: {exc!r}") from exc

    @classmethod
    def _from_pushed(cls, raw: bytes) -> Envelope:
        # The kombu message a script would push (see push.py), published as usual instead.
        try:
            _, message = unpack(raw)
            props = dict(message["properties"])
            info = props.pop("delivery_info", {}) or {}
            body = message["body"]
            if props.pop("body_encoding", None) == "base64":
                body = base64.b64decode(body)
            for name in ("delivery_tag", "redelivered"):
                props.pop(name, None)
            headers = {k: v for k, v in message["headers"].items() if k != HANDOFF_HEADER}
            kwargs = {
                **props,
                "exchange": info.get("exchange", ""),
                "routing_key": info.get("routing_key", ""),
                "headers": headers,
            }
            return cls(body, message["content-type"], message["content-encoding"], kwargs, [])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed parked message: {exc!r}") from exc

    def publish(self, producer: Any, declare: list[Any]) -> Any:
        """Publish with ``producer`` (a kombu Producer), without serializing again."""
        return producer.publish(
            self.data,
            content_type=self.content_type,
            content_encoding=self.content_encoding,
            declare=declare,
            **self.publish_kwargs,
        )


class CapturingProducer:
    """Stands in for a kombu Producer during one ``send_task_message`` call.

    The first ``publish`` (the task message) goes to ``on_task``, which decides whether to
    publish it now; any later one (Celery's ``task-sent`` event) passes straight through.
    Everything else is delegated to the real producer.
    """

    def __init__(self, producer: Any, on_task: Callable[[Any, Envelope], Any]) -> None:
        self._producer = producer
        self._on_task = on_task
        self._seen_task = False

    def publish(self, body: Any, **kwargs: Any) -> Any:
        """Gate the task message; pass any other message through."""
        if self._seen_task:
            return self._producer.publish(body, **kwargs)
        # Marked only once gated: when publishing fails, Celery's retry calls us again, and
        # that second call is still the task (acquire is idempotent for the same id).
        result = self._on_task(self._producer, Envelope.from_publish(body, kwargs))
        self._seen_task = True
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)
