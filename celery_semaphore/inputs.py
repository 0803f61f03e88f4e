"""Results and errors that flow from requirements to the calls that require them.

A requirement's worker encodes its result (or exception) with the app's result serializer
when calls wait for it; Redis keeps it opaque; the dependent's worker decodes it and passes
it as the first argument, the way a chain passes a parent's result.
"""

from __future__ import annotations

import base64
from typing import Any

from celery import Celery
from kombu.serialization import dumps, loads, prepare_accept_content
from kombu.utils import json

from .errors import RequirementFailed

__all__ = ["INPUTS_HEADER", "decode_inputs", "encode_error", "encode_result", "error_text"]

#: Message header carrying a dependent's inputs (JSON list, see lua/common.lua inputs_of).
INPUTS_HEADER = "semaphore_inputs"


def _serializer(app: Celery) -> str:
    return str(app.conf.result_serializer or "json")


def _accept(app: Celery) -> set[str] | None:
    accept = app.conf.result_accept_content or app.conf.accept_content
    return set(prepare_accept_content(accept)) if accept else None


def _pack(value: Any, serializer: str) -> str:
    content_type, encoding, data = dumps(value, serializer=serializer)
    binary = isinstance(data, bytes)
    text = base64.b64encode(data).decode() if binary else data
    return str(json.dumps({"ct": content_type, "ce": encoding, "d": text, "b": binary}))


def _unpack(raw: str, accept: set[str] | None) -> Any:
    doc = json.loads(raw)
    data = base64.b64decode(doc["d"]) if doc["b"] else doc["d"]
    return loads(data, doc["ct"], doc["ce"], accept=accept)


def encode_result(app: Celery, value: Any) -> str:
    """A result as stored for dependents; raises kombu's EncodeError when it cannot be."""
    return _pack(value, _serializer(app))


def encode_error(app: Celery, exc: BaseException) -> str:
    """An exception as stored for dependents (the result backend's portable form)."""
    serializer = _serializer(app)
    try:
        return _pack(app.backend.prepare_exception(exc, serializer), serializer)
    except Exception:  # an exception the serializer cannot carry: its text still flows
        return _pack({"exc_type": "Exception", "exc_message": [repr(exc)],
                      "exc_module": "builtins"}, serializer)  # fmt: skip


def error_text(exc: BaseException | None) -> str:
    """An exception as one line of text, for histories and ``RequirementFailed``."""
    if exc is None:
        return ""
    return f"{type(exc).__name__}: {exc}"


def decode_inputs(app: Celery, raw: str) -> list[Any]:
    """The values a dependent receives, from its inputs header, in ``requires`` order."""
    accept = _accept(app)
    values: list[Any] = []
    for item in json.loads(raw):
        kind, body = item[:1], item[1:]
        if kind == "v":
            values.append(_unpack(body, accept))
        elif kind == "e":
            values.append(app.backend.exception_to_python(_unpack(body, accept)))
        elif kind == "x":
            task, task_id, text = json.loads(body)
            values.append(RequirementFailed(task, task_id, text))
        else:  # "b": the result backend has it (the requirement ended before it was linked)
            values.append(app.AsyncResult(body).result)
    return values
