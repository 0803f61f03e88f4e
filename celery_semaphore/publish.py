"""The submit path: Celery's ``amqp.send_task_message``, gated for gated tasks.

Every publish of a task goes through it (``delay``, ``apply_async``, signatures, chains,
groups, chords, ``send_task`` by name). Celery builds and routes the message; for a gated
task one ``acquire`` script then grants it room (it is published at once), or keeps it with
its serialized message until its start time and room come.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from celery._state import get_current_task
from celery.utils.log import get_logger

from .errors import ConfigurationError, DuplicateCall, GateFull
from .group import Acquired
from .message import CapturingProducer, Envelope
from .push import capture
from .requires import free_gates, link_requirements, take_requirements
from .results import PARKED, WAITING, fail_call, record_revoked, report_waiting
from .runtime import HANDOFF_HEADER, Runtime
from .spec import TaskGates, call_spec

__all__ = ["BACKUP_HEADER", "GATES_HEADER", "HEADER", "Publisher"]

logger = get_logger(__name__)

#: Message header naming the group a call holds; the task id is the token.
HEADER = "semaphore_gate"
#: Message header listing the call's gates (csv), for re-registration after lost data.
GATES_HEADER = "semaphore_gates"
#: Header of a copy sent back as the backup of a call that runs elsewhere (never published).
BACKUP_HEADER = "semaphore_backup"


#: The result state shown while a call waits in its gate (see results.report_waiting).
_WAITS = {Acquired.PARKED: PARKED, Acquired.WAITING: WAITING, Acquired.NEEDS: WAITING}


class Publisher:
    """Stands in for ``app.amqp.send_task_message`` of one app."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._original_send: Any = None

    def _original(self) -> Any:
        if self._original_send is None:
            # Built lazily, so that installing does not load the app's configuration.
            self._original_send = self.runtime.app.amqp._create_task_sender()
        return self._original_send

    def __call__(self, producer: Any, name: str, message: Any, **options: Any) -> Any:
        """Celery's ``send_task_message``, gated for gated tasks."""
        rt = self.runtime
        gates = rt.gates_of(name)
        needs = take_requirements(rt, options)
        if gates is None:
            if needs is None:
                return self._original()(producer, name, message, **options)
            gates = free_gates(rt, name)  # a workflow node: its end must be counted
        headers = message[0]
        if not isinstance(headers, dict) or "id" not in headers:
            # Protocol 1 carries no headers to hold the token: refuse rather than publish a
            # gated call without its gates.
            raise ConfigurationError(
                f"{name} is gated, which needs Celery's task protocol 2 (the default); "
                f"task_protocol is {rt.app.conf.task_protocol}"
            )
        task_id = headers["id"]
        headers[HEADER] = gates.group
        headers[GATES_HEADER] = ",".join(gates.names)
        # A backup flag must not be published (a backup that finally runs and retries would
        # look like one). It arrives in the apply_async headers option, which Celery merges
        # into the message only inside the original sender, so it is taken out of both.
        backup = headers.pop(BACKUP_HEADER, None) == "1"
        # Nor a hand-off mark, which a retry or re-send copies from its run's headers: this
        # message is not published from Redis, and no stored message would replace a run that
        # the guard skipped for it (see guard.refuse_if_denied).
        headers.pop(HANDOFF_HEADER, None)
        extra = options.get("headers")
        if isinstance(extra, dict) and (BACKUP_HEADER in extra or HANDOFF_HEADER in extra):
            extra = dict(extra)
            backup = extra.pop(BACKUP_HEADER, None) == "1" or backup
            extra.pop(HANDOFF_HEADER, None)
            options["headers"] = extra
        task = rt.app.tasks.get(name)
        redeliver = bool(
            getattr(task, "acks_late", False) or getattr(task, "reject_on_worker_lost", False)
        )
        args, kwargs = _arguments(message)
        # The gate's own per-call options: taken out, so Celery does not publish them as
        # message properties.
        overflow = {k: options.pop(k, None) for k in ("max_pending", "on_full", "wait_timeout")}
        track = bool(options.pop("track", False)) or rt.settings.track
        record: dict[str, Any] = {"task": name, **(needs.fields if needs else {})}
        if track or any(s.track for s in gates.specs):
            record["track"] = True
        if rt.settings.prefetch and rt.broker_push:
            # A call sent ahead that ends without its grant is remembered this long, so that
            # its copy outside Redis is refused.
            record["prefetch"] = rt.settings.prefetch
            record["dedupe_ms"] = int(rt.settings.dedupe_window_s * 1000)
        spec = call_spec(
            gates, rt.settings, args, kwargs, options.get("priority"), redeliver, **overflow
        )
        flags = "b" if backup else ""
        current = get_current_task()
        own_run = current is not None and getattr(current.request, "id", None) == task_id
        if not backup and (own_run or int(headers.get("retries") or 0) > 0):
            flags = "r"  # a retry, a replacement or Celery's retry of a lost child
        if own_run and current is not None:
            current.request.semaphore_resent = gates.group
        eta = headers.get("eta")
        delay_ms = _delay_ms(eta, rt.app.now()) if eta else 0
        enforce_limits(rt, gates)

        def on_task(real_producer: Any, envelope: Envelope) -> Any:
            group = rt.group(gates.group)
            # Where the broker is the gates' Redis, the script itself puts the message in the
            # broker's queue when it grants the call (see push.py).
            message = capture(real_producer, envelope) if rt.broker_push else None
            outcome, pending, stored, grants, extra = group.acquire(
                task_id,
                spec.to_json(gates.names, **record),
                gates.limits,
                message or envelope.encode,
                lease_ms=spec.lease_ms,
                delay_ms=delay_ms,
                flags=flags,
            )
            note_limits(rt, gates, stored)
            rt.dispatch(gates.group, grants)
            if rt.settings.report_waiting and outcome in _WAITS:
                report_waiting(rt.app, task_id, _WAITS[outcome])
            if outcome is Acquired.NEEDS and needs is not None:
                try:
                    link_requirements(rt, gates.group, task_id, needs.requirements, needs.future)
                except BaseException:
                    # The caller sees the error: the call must not wait on a partial link.
                    _, replies = group.cancel(task_id, reason="its requirements were not linked")
                    rt.dispatch(gates.group, replies)
                    raise
                return None
            if outcome is Acquired.REJECTED:
                raise GateFull(gates.gate, stored[0], pending)
            if outcome is Acquired.FULL_DROPPED:
                fail_call(rt.app, task_id, GateFull(gates.gate, stored[0], pending), envelope)
                return None
            _overflowed(rt, gates, task_id, extra)
            if outcome is Acquired.PUSHED:
                return None
            if outcome is Acquired.RESENT:
                # The first send's message may never have reached the broker (its caller got
                # AcceptanceUnknown): publish a copy; only one copy runs (see acquire.lua).
                envelope.publish(real_producer, envelope.declare)
            if outcome in (Acquired.DUPLICATE, Acquired.RESENT):
                raise DuplicateCall(gates.gate, task_id)
            if outcome not in (Acquired.GRANTED, Acquired.HELD):
                return None  # kept in Redis: published when it is handed room
            try:
                return envelope.publish(real_producer, envelope.declare)
            except BaseException:
                if outcome is Acquired.GRANTED:
                    # The caller sees the error and was never told the call was accepted.
                    rt.release(gates.group, task_id, None)
                raise

        return self._original()(CapturingProducer(producer, on_task), name, message, **options)


def note_limits(rt: Runtime, gates: TaskGates, stored: list[int]) -> None:
    """Warn once per gate when Redis holds another limit than this process's configuration."""
    for name, mine, theirs in zip(gates.names, gates.limits, stored, strict=False):
        if mine != theirs and name not in rt.limits_seen:
            rt.limits_seen.add(name)
            logger.warning(
                "celery_semaphore: gate %r is configured with limit %s here, but the limit in "
                "force (stored in Redis) is %s; the stored one applies. Resize the gate, or "
                "set semaphore_limit_source = 'config' to make the configuration win.",
                name,
                mine,
                theirs,
            )


def enforce_limits(rt: Runtime, gates: TaskGates) -> None:
    """With ``semaphore_limit_source = 'config'``: write the configured limits once."""
    if rt.settings.limit_source != "config":
        return
    for name, limit in zip(gates.names, gates.limits, strict=True):
        if name not in rt.limits_seen:
            rt.limits_seen.add(name)
            _, grants = rt.group(gates.group).resize(name, limit)
            rt.dispatch(gates.group, grants)


_last_warning: dict[str, float] = {}


def _overflowed(rt: Runtime, gates: TaskGates, task_id: str, extra: tuple[Any, ...]) -> None:
    """Report what ``max_pending`` did to a parked call: parked over the cap, or replaced."""
    if not extra:
        return
    if extra[0] == "replaced":
        victim = str(extra[1])
        record_revoked(rt.app, victim, f"replaced by call {task_id} (on_full='replace')")
        return
    now = time.monotonic()
    if now - _last_warning.get(gates.gate, -60.0) >= 60.0:  # once a minute per gate
        _last_warning[gates.gate] = now
        logger.warning(
            "gate %r: %s calls wait, more than max_pending; call %s parked anyway (on_full='park')",
            gates.gate,
            extra[1],
            task_id,
        )


def _arguments(message: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's args and kwargs from a protocol 2 message body."""
    body = message[2] if len(message) > 2 else None
    if isinstance(body, (tuple, list)) and len(body) >= 2:
        return tuple(body[0] or ()), dict(body[1] or {})
    return (), {}


def _delay_ms(eta: Any, now: datetime) -> int:
    """Milliseconds from ``now`` until a message's ETA header (0 when it has none).

    ``now`` is the clock Celery computed the ETA with (``app.now()``), so a client whose clock
    is off still passes the right countdown; the wait itself is timed on Redis.
    """
    if not eta:
        return 0
    try:
        when = datetime.fromisoformat(eta) if isinstance(eta, str) else eta
    except ValueError:
        return 0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return max(0, int((when - now).total_seconds() * 1000))
