"""Per-app state: settings, the Redis client, the groups, and the gates of each task.

Below the Celery integration (publish hook, receivers, bootstep, tick) and above the Redis
model (:mod:`celery_semaphore.group`): each of those finds everything it needs here in one
hop, through :func:`runtime_for`.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from typing import Any

import redis
from celery import Celery
from celery.utils.log import get_logger

from .config import Settings
from .connect import connect, kind_of, sanitize
from .errors import ConfigurationError, RedisUnavailable
from .group import Grant, Group, Malformed
from .inputs import INPUTS_HEADER
from .message import Envelope
from .outcome import Reply
from .push import HANDOFF_HEADER, broker_is_gates
from .scripts import Scripts
from .spec import TaskGates, check_agreement, resolve, specs_of

__all__ = [
    "HANDOFF_HEADER",
    "LOCK_MESSAGE",
    "WORKFLOW_HEADER",
    "Runtime",
    "runtime_for",
    "recurring_keys",
    "runtimes",
    "wake_channel",
]

logger = get_logger(__name__)

#: Header of a workflow node: "<workflow id>:<1 when fail_fast, else 0>".
WORKFLOW_HEADER = "semaphore_workflow"
#: The stored "message" of a Semaphore hold: not a task, a process to wake.
LOCK_MESSAGE = b"semaphore-lock:"


def recurring_keys(prefix: str) -> list[str]:
    """The keys of the recurring schedules (see lua/recur_add.lua)."""
    tag = f"{{{prefix}:recurring}}"
    return [f"{tag}:schedules", f"{tag}:due"]


def wake_channel(prefix: str, hold_id: str) -> str:
    """The pub/sub channel a waiting :class:`~celery_semaphore.Semaphore` hold listens on."""
    return f"{prefix}:granted:{hold_id}"


_runtimes: weakref.WeakKeyDictionary[Celery, Runtime] = weakref.WeakKeyDictionary()
_lock = threading.RLock()


def runtime_for(app: Celery | None, *, create: bool = False) -> Runtime | None:
    """The runtime of ``app`` (made when ``create``), or ``None`` when it has none."""
    if app is None:
        return None
    rt = _runtimes.get(app)  # read on every signal of every task: no lock once made
    if rt is not None or not create:
        return rt
    with _lock:
        rt = _runtimes.get(app)
        if rt is None:
            rt = _runtimes[app] = Runtime(app)
        return rt


def runtimes() -> list[Runtime]:
    """Every runtime of this process."""
    return list(_runtimes.values())


class Runtime:
    """What celery_semaphore keeps per Celery app."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._gates: dict[str, TaskGates | None] = {}
        self._groups: dict[str, Group] = {}
        #: Gates whose stored limit this process compared with its own (see publish.py).
        self.limits_seen: set[str] = set()
        self._registered: set[str] = set()
        self._lock = threading.Lock()
        self._scheduler_lock = threading.Lock()
        #: Builds the app's Scheduler (set by ``install``, which owns that layer).
        self.scheduler_factory: Any = None
        self._scheduler: Any = None
        self._scheduler_built = False
        #: Where the tick's sweep over every group goes on (see tick._sweep).
        self.sweep_cursor = 0
        self._configured: frozenset[str] | None = None
        self._known: tuple[tuple[frozenset[str], int], list[str]] | None = None
        #: Acts on a script's follow-ups (set by ``install``: see :mod:`.requires`).
        self.follow: Callable[[str, Sequence[Reply]], None] | None = None
        #: Called with (task id, its workflow header) when a call fails (see fail_fast).
        self.on_node_failed: Callable[[str, str], None] | None = None

    @property
    def scheduler(self) -> Any:
        """The app's :class:`~celery_semaphore.Scheduler` (built on first use), or ``None``."""
        # Read on every release: once built (or found to be none), no lock and no call.
        if not self._scheduler_built and self.scheduler_factory is not None:
            with self._scheduler_lock:
                if not self._scheduler_built:
                    self._scheduler = self.scheduler_factory(self)
                    self._scheduler_built = True
        return self._scheduler

    @cached_property
    def settings(self) -> Settings:
        """The validated ``semaphore_*`` settings (read on first use)."""
        settings = Settings.from_conf(self.app.conf)
        if settings.redis_url_is_broker:
            logger.info(
                "celery_semaphore: semaphore_redis_url is not set; the gates live in the "
                "broker's Redis, %s",
                sanitize(settings.redis_url),
            )
        return settings

    @cached_property
    def client(self) -> redis.Redis:
        """The Redis client of the gates: one server, a Sentinel's master, or a Redis Cluster
        (see :mod:`.connect`; redis-py resets its pool in a forked child).

        Raises:
            RedisUnavailable: a cluster none of whose nodes answers.
        """
        s = self.settings
        try:
            client = connect(s.redis_url, cluster=s.redis_cluster, timeout_s=s.redis_timeout_s)
        except redis.RedisError as exc:
            raise RedisUnavailable(self.url, exc) from exc
        return client  # type: ignore[no-any-return]

    @cached_property
    def broker_push(self) -> bool:
        """Whether grants push messages into the broker's queues themselves: the broker is
        the gates' Redis server and database (see :mod:`.push`; ``semaphore_broker_push``)."""
        s = self.settings
        push = (
            s.broker_push
            and kind_of(s.redis_url, s.redis_cluster) == "single"
            and broker_is_gates(self.app, self.client)
        )
        if s.prefetch and not push:
            logger.warning(
                "celery_semaphore: semaphore_prefetch = %d has no effect: it needs broker push "
                "(the broker in the gates' Redis server and database, semaphore_broker_push on)",
                s.prefetch,
            )
        return push

    @cached_property
    def scripts(self) -> Scripts:
        """The Lua scripts registered on :attr:`client`."""
        return Scripts(self.client)

    @property
    def url(self) -> str:
        """The gates' Redis URL without its password."""
        return sanitize(self.settings.redis_url)

    def group(self, name: str) -> Group:
        """The :class:`Group` named ``name`` (built once per process)."""
        group = self._groups.get(name)
        if group is None:
            with self._lock:
                group = self._groups.get(name)
                if group is None:
                    s = self.settings
                    group = self._groups[name] = Group(
                        self.client,
                        self.scripts,
                        name,
                        prefix=s.key_prefix,
                        url=self.url,
                        dedupe_window_s=s.dedupe_window_s,
                        dropped_after_s=s.dropped_after_s,
                        max_dispatches=s.max_dispatches,
                        history_s=s.history_ttl_s,
                        wait_replicas=s.wait_replicas,
                        cluster=kind_of(s.redis_url, s.redis_cluster) == "cluster",
                    )
                    group.recover_ms = int(s.lease_s * 1000)
        return group

    def group_of_gate(self, gate: str) -> Group:
        """The group a gate lives in (``semaphore_groups``, else the gate's own name)."""
        for gates in self.task_gates():
            if gate in gates.names:
                return self.group(gates.group)
        return self.group(self.settings.groups.get(gate, gate))

    # -- tasks and their gates ---------------------------------------------------------

    def gates_of(self, task_name: str) -> TaskGates | None:
        """The resolved gates of a task by name, or ``None`` when it is not gated here.

        Found from the task itself (the decorator above or below ``@app.task``), so every
        process that has the task registered (a prefork child, beat, a sender) agrees.

        Raises:
            ConfigurationError: the task's gates are misconfigured (see ``spec.resolve``).
        """
        try:
            return self._gates[task_name]
        except KeyError:
            pass
        task = (
            self.app.tasks.get(task_name) if self.app.finalized else self.app._tasks.get(task_name)
        )
        specs = specs_of(task) if task is not None else ()
        gates = resolve(task_name, specs, self.settings) if specs else None
        if gates is not None:
            self._check_consistent(gates)
        if task is not None:
            self._gates[task_name] = gates
        return gates

    def check_specs(self, task_name: str, specs: tuple[Any, ...]) -> None:
        """Refuse, at decoration, a gate that two tasks' decorators configure differently.

        Only what the decorators say is compared (settings may not be loaded yet); the
        groups the settings give are compared when a call is first sent.

        Raises:
            ConfigurationError: the limits or groups of one gate disagree.
        """
        for name, task in list(self.app._tasks.items()):
            if name != task_name:
                check_agreement(task_name, specs, None, name, specs_of(task), None)

    def _check_consistent(self, gates: TaskGates) -> None:
        for other in self._gates.values():
            if other is not None:
                check_agreement(
                    gates.task, gates.specs, gates.group, other.task, other.specs, other.group
                )

    def task_gates(self) -> list[TaskGates]:
        """The gates of every gated task of the app."""
        names = list(self.app.tasks.keys()) if self.app.finalized else list(self.app._tasks)
        found = []
        for name in names:
            with contextlib.suppress(ConfigurationError):
                gates = self.gates_of(name)
                if gates is not None:
                    found.append(gates)
        return found

    def known_groups(self) -> list[str]:
        """Every group this app knows: gated tasks, configured limits, scheduler slots, and the
        groups a :class:`~celery_semaphore.Semaphore` of any process registered in Redis (so
        beat's tick reclaims a dead holder's unit even where no task names that gate)."""
        extra: set[str] = set()
        if self.scheduler is not None:
            extra.update(self.scheduler.groups())
        with contextlib.suppress(redis.RedisError):
            members = self.client.smembers(self.registry_key)
            extra.update(m.decode() if isinstance(m, bytes) else str(m) for m in members)
        configured = self._configured or self.configured_groups()
        key = (frozenset(extra), len(configured))
        if self._known is None or self._known[0] != key:
            # Sorted once per change: ten thousand gates would cost the tick milliseconds.
            self._known = (key, sorted(configured | extra))
        return list(self._known[1])

    def configured_groups(self) -> set[str]:
        """The groups this app's tasks and settings name (every process of the app knows them;
        kept once the app is finalized, when its tasks no longer change)."""
        if self._configured is not None:
            return set(self._configured)
        groups = {g.group for g in self.task_gates()}
        groups.update(self.settings.groups.get(n, n) for n in self.settings.limits)
        if self.app.finalized:
            self._configured = frozenset(groups)
        return groups

    @property
    def registry_key(self) -> str:
        """The set of groups that Semaphore holds use (outside any group's hash tag)."""
        return f"{{{self.settings.key_prefix}:registry}}:groups"

    def register_group(self, name: str) -> None:
        """Record, once per process, that a Semaphore uses group ``name`` (unless the app's
        tasks or settings name it already: then beat knows it without the registry)."""
        if name not in self._registered:
            if name not in self.configured_groups():
                self.client.sadd(self.registry_key, name)
            self._registered.add(name)

    # -- sending what Redis handed room -------------------------------------------------

    def dispatch(self, group: str, grants: list[Reply], malformed: Iterable[Malformed] = ()) -> int:
        """Publish calls that were handed room; returns how many were published.

        A call that cannot be published now keeps its message in Redis: when its lease
        expires the tick sends it again, so it is delayed, never lost. The reply's follow-ups
        (traces, calls ended by a requirement, notices to other groups) go to :attr:`follow`.
        """
        if not grants and not malformed:
            return 0  # the common end: nothing was handed on
        others = [g for g in grants if not isinstance(g, Grant)]
        if others and self.follow is not None:
            self.follow(group, others)
        for entry in malformed:
            logger.error(
                "gate group %r: moved aside an unreadable entry %s: %r",
                group,
                entry.task_id,
                entry.raw[:200],
            )
        calls: list[Grant] = []
        pushed = 0
        for grant in grants:
            if not isinstance(grant, Grant):
                continue
            if grant.pushed:
                pushed += 1  # the script put it in the broker's queue (see push.py)
                continue
            if grant.message.startswith(LOCK_MESSAGE):
                # A Semaphore hold waiting in a plain process: wake it (it subscribed before it
                # parked; if it missed this, it finds the grant by polling its record).
                self.client.publish(
                    wake_channel(self.settings.key_prefix, grant.task_id), grant.fence
                )
            else:
                calls.append(grant)
        if not calls:
            return pushed
        sent = pushed
        with self.app.producer_or_acquire() as producer:
            queues = self.app.amqp.queues
            for grant in calls:
                try:
                    envelope = Envelope.decode(grant.message)
                except ValueError:
                    logger.error(
                        "gate group %r: call %s has an unreadable message; moved aside",
                        group,
                        grant.task_id,
                    )
                    self.group(group).set_aside(grant.task_id, grant.message)
                    self.release(group, grant.task_id, grant.fence)  # its room goes on
                    continue
                headers = envelope.publish_kwargs.setdefault("headers", {})
                if isinstance(headers, dict):
                    headers[HANDOFF_HEADER] = "1"
                    if grant.inputs:
                        headers[INPUTS_HEADER] = grant.inputs
                try:
                    envelope.publish(producer, [queues[q] for q in envelope.queues if q in queues])
                    sent += 1
                except Exception:
                    logger.exception(
                        "gate group %r: could not publish call %s; it is sent again when its "
                        "lease expires",
                        group,
                        grant.task_id,
                    )
        return sent

    def release(
        self,
        group: str,
        task_id: str,
        fence: int | None,
        *,
        state: str = "SUCCEEDED",
        payload: str = "",
        text: str = "",
    ) -> bool:
        """Give back a call's hold and publish the calls handed room; whether one was freed.

        ``state``, ``payload`` and ``text`` say how it ended (see :meth:`Group.release`).
        """
        outcome = self.group(group).release(task_id, fence, state=state, payload=payload, text=text)
        self.dispatch(group, outcome.grants, outcome.malformed)
        if outcome.released and self.scheduler is not None:
            # The idle slots of the group poll again at once; a task a scheduler slot
            # started also tells its backend of its end.
            if outcome.backend:
                self.scheduler.stopped(group, task_id, outcome.backend)
            else:
                self.scheduler.fill(group)
        return outcome.released
