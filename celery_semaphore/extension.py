"""``install(app)``: the one place where celery_semaphore touches a Celery app.

It wraps the app's ``amqp.send_task_message`` (every publish of a task goes through it:
``delay``, ``apply_async``, signatures, chains, groups, chords, ``send_task`` by name),
connects the signal receivers, adds the keepalive bootstep and the ``celery_semaphore.tick``
task and its beat entry. Everything is idempotent; importing the package does none of it.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import redis
from celery import Celery
from celery.utils.log import get_logger
from kombu.utils.url import maybe_sanitize_url

from . import signals
from .config import Settings
from .decorator import GateSpec, spec_of
from .errors import ConfigurationError
from .gate import Acquired, Gate, Grant
from .message import CapturingProducer, Envelope
from .scheduler import Scheduler
from .scripts import Scripts

__all__ = ["TICK_TASK", "Extension", "extension_for", "install", "installed_extensions"]

logger = get_logger(__name__)

#: Name of the beat-scheduled task that reclaims expired leases and dispatches parked calls.
TICK_TASK = "celery_semaphore.tick"

_extensions: weakref.WeakKeyDictionary[Celery, Extension] = weakref.WeakKeyDictionary()
_lock = threading.RLock()


def install(app: Celery) -> Extension:
    """Install celery_semaphore on ``app``; calling it again returns the same extension.

    The first ``@gated`` task of an app calls this, so users rarely need to.

    Args:
        app: the Celery application.

    Returns:
        The app's :class:`Extension`.

    Examples:
        >>> app = Celery("proj", broker="redis://localhost:6379/0")
        >>> app.conf.semaphore_limits = {"crawler": 4}
        >>> ext = install(app)
    """
    with _lock:
        ext = _extensions.get(app)
        if ext is None:
            ext = Extension(app)
            _extensions[app] = ext
            ext._setup()
        return ext


def install_if_gated(app: Celery) -> None:
    """Install on ``app`` when one of its tasks is gated (a hook run when an app is finalized)."""
    if app not in _extensions and any(spec_of(t) for t in list(app._tasks.values())):
        install(app)


def extension_for(app: Celery | None) -> Extension | None:
    """Return the extension installed on ``app``, or ``None``."""
    return _extensions.get(app) if app is not None else None


def installed_extensions() -> list[Extension]:
    """Every extension installed in this process."""
    return list(_extensions.values())


class Extension:
    """Per-app state: settings, the Redis client, the gates and the publish hook."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._specs: dict[str, GateSpec | None] = {}
        self._gates_lock = threading.Lock()
        self._original_send: Any = None

    # -- setup -----------------------------------------------------------------------------

    def _setup(self) -> None:
        app = self.app
        # amqp.send_task_message is a cached_property: an instance attribute replaces it. The
        # original is built lazily so that installing does not load the app's configuration.
        app.amqp.send_task_message = self.send_task_message
        signals.connect()
        from .worker import Keepalive

        app.steps["worker"].add(Keepalive)
        from .tick import register_tick

        register_tick(app)

    # -- settings and gates ----------------------------------------------------------------

    @cached_property
    def settings(self) -> Settings:
        """The validated ``semaphore_*`` settings (read on first use)."""
        return Settings.from_conf(self.app.conf)

    @cached_property
    def client(self) -> redis.Redis:
        """The Redis client of the slots (redis-py resets its pool in a forked child)."""
        timeout = self.settings.redis_timeout_s
        return redis.Redis.from_url(
            self.settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    @cached_property
    def scripts(self) -> Scripts:
        """The Lua scripts registered on :attr:`client`."""
        return Scripts(self.client)

    def register(self, task_name: str, spec: GateSpec) -> None:
        """Record that ``task_name`` is gated by ``spec`` (``@gated`` above a task calls this).

        Raises:
            ConfigurationError: another task gives the same semaphore a different limit.
        """
        for other_name, other in self._specs.items():
            if (
                other is not None
                and other.gate == spec.gate
                and None not in (other.limit, spec.limit)
                and other.limit != spec.limit
            ):
                raise ConfigurationError(
                    f"semaphore {spec.gate!r} gets limit {spec.limit} from {task_name} but "
                    f"{other.limit} from {other_name}; give it one limit "
                    "(or set it only in semaphore_limits)"
                )
        self._specs[task_name] = spec

    def spec_for(self, task_name: str) -> GateSpec | None:
        """Return the gate spec of a task by name, or ``None`` if it is not gated."""
        try:
            return self._specs[task_name]
        except KeyError:
            pass
        task = self.app._tasks.get(task_name)
        spec = spec_of(task) if task is not None else None
        if spec is not None and spec.gate is None:
            spec = GateSpec(task_name, spec.limit, spec.lease_s)
        if task is not None:
            # Cache only names the registry knows: a task registered later is looked up again.
            if spec is not None:
                self.register(task_name, spec)
            else:
                self._specs[task_name] = None
        return spec

    def gate_name_of_task(self, task_name: str) -> str | None:
        """The semaphore a task is gated by, or ``None``."""
        spec = self.spec_for(task_name)
        return spec.gate if spec is not None else None

    def known_gates(self) -> list[str]:
        """Every semaphore this app knows: configured limits and gated tasks."""
        for name in list(self.app._tasks.keys()):
            self.spec_for(name)
        names = set(self.settings.limits) | set(self.scheduler.gates)
        names.update(s.gate for s in self._specs.values() if s is not None and s.gate)
        return sorted(names)

    def limit_of(self, gate: str) -> int:
        """The limit of a semaphore: the decorator's, else ``semaphore_limits``.

        Raises:
            ConfigurationError: no limit is given anywhere.
        """
        for spec in self._specs.values():
            if spec is not None and spec.gate == gate and spec.limit is not None:
                return spec.limit
        defined = self.scheduler.gate(gate)
        if defined is not None:
            return defined.limit
        limit = self.settings.limits.get(gate)
        if limit is None:
            raise ConfigurationError(
                f"semaphore {gate!r} has no limit: add it to the semaphore_limits setting "
                f"(app.conf.semaphore_limits = {{{gate!r}: N}}) or pass limit= to @gated"
            )
        return limit

    @cached_property
    def scheduler(self) -> Scheduler:
        """The app's Scheduler: a semaphore per gate, plus the ``semaphore_slots`` slots.

        Raises:
            ConfigurationError: ``semaphore_slots`` is invalid, or defines the slots of a
                semaphore that ``semaphore_limits`` sizes too.
        """
        scheduler = Scheduler(
            {"app": self.app, "redis_c": self.client, "extension": self},
            prefix=self.settings.key_prefix,
            gate_factory=self._new_gate,
        )
        scheduler.load(self.settings.slots)
        both = sorted(set(scheduler.gates) & set(self.settings.limits))
        if both:
            raise ConfigurationError(
                f"semaphore {both[0]!r} is sized by semaphore_limits and by semaphore_slots; "
                "define its slots in one of them"
            )
        return scheduler

    def _new_gate(self, name: str, limit: int, lease_s: float) -> Gate:
        return Gate(
            self.client,
            self.scripts,
            name,
            limit,
            lease_s,
            prefix=self.settings.key_prefix,
            url=maybe_sanitize_url(self.settings.redis_url),
            dedupe_window_s=self.settings.dedupe_window_s,
            dropped_after_s=self.settings.dropped_after_s,
        )

    def gate(self, name: str) -> Gate:
        """The :class:`Gate` of semaphore ``name`` (built once per process)."""
        gate = self.scheduler.gate(name)
        if gate is None:
            with self._gates_lock:
                gate = self.scheduler.gate(name) or self.scheduler.add_semaphore(
                    name, self.limit_of(name), self.settings.lease_s
                )
        return gate

    # -- publishing ------------------------------------------------------------------------

    def _original(self) -> Any:
        if self._original_send is None:
            self._original_send = self.app.amqp._create_task_sender()
        return self._original_send

    def send_task_message(self, producer: Any, name: str, message: Any, **options: Any) -> Any:
        """Celery's ``amqp.send_task_message``, gated for gated tasks."""
        spec = self.spec_for(name)
        if spec is None:
            return self._original()(producer, name, message, **options)
        headers = message[0]
        if not isinstance(headers, dict) or "id" not in headers:
            # Protocol 1 carries no headers to hold the slot's token: refuse rather than
            # publish a gated call without a slot.
            raise ConfigurationError(
                f"{name} is gated, which needs Celery's task protocol 2 (the default); "
                f"task_protocol is {self.app.conf.task_protocol}"
            )
        gate = self.gate(spec.gate or name)
        headers[signals.HEADER] = gate.name
        # Not published: a backup must not look like one when it finally runs and retries.
        # The flag arrives in the apply_async headers option, which Celery merges into the
        # message only inside the original sender, so it is taken out of both.
        backup = headers.pop(signals.BACKUP_HEADER, None) == "1"
        extra_headers = options.get("headers")
        if isinstance(extra_headers, dict) and signals.BACKUP_HEADER in extra_headers:
            extra_headers = dict(extra_headers)
            backup = extra_headers.pop(signals.BACKUP_HEADER) == "1" or backup
            options["headers"] = extra_headers
        eta = headers.get("eta")
        delay_ms = _delay_ms(eta, self.app.now()) if eta else 0

        def on_task(real_producer: Any, envelope: Envelope) -> Any:
            return self._publish_gated(
                gate, spec, headers["id"], delay_ms, backup, real_producer, envelope
            )

        return self._original()(CapturingProducer(producer, on_task), name, message, **options)

    def _publish_gated(
        self,
        gate: Gate,
        spec: GateSpec,
        task_id: str,
        delay_ms: int,
        backup: bool,
        producer: Any,
        envelope: Envelope,
    ) -> Any:
        outcome, _ = gate.acquire(
            task_id, envelope.encode, delay_ms=delay_ms, lease_s=spec.lease_s, backup=backup
        )
        if outcome not in (Acquired.GRANTED, Acquired.HELD):
            return None  # parked, or kept as a backup: published when a slot is handed over
        try:
            return envelope.publish(producer, envelope.declare)
        except BaseException:
            if outcome is Acquired.GRANTED:
                # The caller sees the error and was never told the call was accepted.
                self.release(gate.name, task_id, None)
            raise

    def release(self, gate_name: str, task_id: str, fence: int | None) -> bool:
        """Free a call's slot and publish the calls handed a slot; returns whether one was freed."""
        self.gate(gate_name)
        return self.scheduler.stop(task_id, semaphore=gate_name, fence=fence)

    def cancel(self, task_id: str) -> bool:
        """Remove a parked call and record it as REVOKED; returns whether it was parked.

        A call that already holds a slot is not affected: revoke it with Celery as usual.
        """
        for name in self.known_gates():
            if self.gate(name).cancel(task_id):
                # Without a result backend there is nowhere to record it.
                with contextlib.suppress(NotImplementedError):
                    self.app.backend.mark_as_revoked(task_id, reason="cancelled while parked")
                return True
        return False

    def dispatch(self, gate_name: str, grants: list[Grant]) -> int:
        """Publish handed-off calls; returns how many were published.

        A call that cannot be published now keeps its message in Redis: when its lease
        expires the tick parks it again, so it is delayed, never lost.
        """
        if not grants:
            return 0
        sent = 0
        with self.app.producer_or_acquire() as producer:
            queues = self.app.amqp.queues
            for grant in grants:
                try:
                    envelope = Envelope.decode(grant.message)
                except ValueError:
                    logger.error(
                        "semaphore %r: call %s has an unreadable message; moved aside",
                        gate_name,
                        grant.task_id,
                    )
                    self.gate(gate_name).set_aside(grant.task_id, grant.message)
                    self.release(gate_name, grant.task_id, grant.fence)
                    continue
                try:
                    envelope.publish(producer, [queues[q] for q in envelope.queues])
                    sent += 1
                except Exception:
                    logger.exception(
                        "semaphore %r: could not publish call %s; it is parked again when its "
                        "lease expires",
                        gate_name,
                        grant.task_id,
                    )
        return sent

    # -- keepalive and tick ----------------------------------------------------------------

    def keepalive_interval(self) -> float:
        """Seconds between two keepalives of running calls: a third of the shortest lease.

        Leases come from ``semaphore_lease``, ``@gated(lease=...)`` and the ``timeout`` of
        the ``semaphore_slots`` slots, whose tasks the same keepalive renews.
        """
        leases = [self.settings.lease_s]
        leases += [s.lease_s for s in self._specs.values() if s is not None and s.lease_s]
        leases += [slot.timeout_s for slot in self.scheduler.slots]  # semaphore_slots timeouts
        return max(min(leases) / 3.0, 0.05)

    def keepalive(self, calls: dict[str, list[str]]) -> list[str]:
        """Renew the leases of ``{gate: [call ids]}``; returns the calls whose lease was lost."""
        lost: list[str] = []
        for gate_name, ids in calls.items():
            self.gate(gate_name)  # loads the semaphore into the scheduler
            lost += self.scheduler.renew(gate_name, ids)
        return lost

    def tick(self) -> dict[str, Any]:
        """Reclaim expired leases, fire timeout callbacks, fill free slots, for every semaphore.

        Two ticks at once are harmless: each expired lease and each free slot is taken by
        exactly one script run.
        """
        for name in self.known_gates():
            try:
                self.gate(name)
            except ConfigurationError:
                # One misconfigured semaphore must not stop the others' recovery.
                logger.exception("semaphore %r: skipped by the tick", name)
        return self.scheduler.schedule()


def cancel(result: Any, app: Celery | None = None) -> bool:
    """Cancel a parked call: it leaves the queue and its result is recorded as REVOKED.

    Args:
        result: the call's ``AsyncResult`` or task id.
        app: the Celery app (default: the result's app, else the current app).

    Returns:
        Whether the call was parked (and is now cancelled).
    """
    from celery import current_app

    app = app or getattr(result, "app", None) or current_app._get_current_object()
    ext = extension_for(app)
    return ext.cancel(str(getattr(result, "id", result))) if ext is not None else False


def _delay_ms(eta: Any, now: datetime) -> int:
    """Milliseconds from ``now`` until a message's ETA header (0 when it has none).

    ``now`` is the clock Celery computed the ETA with (``app.now()``), so a client whose clock
    is off still passes the right countdown; the lease itself is timed on Redis.
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
