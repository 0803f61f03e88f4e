"""A gate group in Redis: every state change of its gates through one Lua script.

A group is one Redis hash tag; the gates stacked on one task live in one group, so a call
takes all of them in one atomic step (and on one Redis Cluster slot). No Celery import here:
a :class:`Group` knows call ids, gates, leases and opaque messages, so the Celery layer, the
:class:`~celery_semaphore.Scheduler` and the tests drive the same object.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import redis
import redis.sentinel

from .config import DEFAULTS
from .due import index_key, note_due
from .errors import AcceptanceUnknown, RedisUnavailable
from .outcome import (
    Acquired,
    Admission,
    Claimed,
    Due,
    Grant,
    Malformed,
    Reclaim,
    Reclaimed,
    Release,
    Reply,
    Started,
)
from .replies import split_grants
from .scripts import Scripts, code_of
from .views import GroupViews
from .views import text as as_text
from .wire import ScriptCall

logger = logging.getLogger(__name__)

__all__ = [
    "Acquired",
    "Claimed",
    "Grant",
    "Group",
    "KEY_PARTS",
    "Malformed",
    "Reclaim",
    "Reclaimed",
    "Release",
    "Started",
    "keys_for",
]


#: The keys of one group, in the order the scripts receive them (see lua/common.lua).
KEY_PARTS = (
    "state", "calls", "messages", "holders", "queue", "lanes", "bands", "blocked", "delayed",
    "usage", "ended", "suspect", "aside", "slots", "pending", "expires", "history", "done",
    "dependents", "outbox", "journal", "since",
)  # fmt: skip


def keys_for(prefix: str, group: str) -> tuple[str, ...]:
    """Return the Redis keys of ``group``; they share one hash tag for Redis Cluster."""
    tag = f"{{{prefix}:{group}}}"
    return tuple(f"{tag}:{part}" for part in KEY_PARTS)


def _before_sending(exc: BaseException) -> bool:
    """Whether a connection error happened before a request went out (nothing was sent)."""
    if isinstance(exc, (redis.sentinel.MasterNotFoundError, redis.exceptions.ClusterError)):
        return True
    return "connecting" in str(exc)


class Group(GroupViews):
    """The gates of one hash tag, held as leases in Redis.

    Args:
        client: a redis-py client (``decode_responses=False``).
        scripts: the scripts registered on ``client``.
        name: the group's name (by default a gate's own name).
        prefix: first part of every key.
        url: the Redis URL, named in errors.
        dedupe_window_s: how long a call that must not start again is remembered.
        dropped_after_s: grace before a dead holder's call is reported dropped.
        max_dispatches: how many times a call is handed room without starting.

    Every method takes an optional ``now_ms`` so tests can drive the clock; by default the
    scripts read Redis ``TIME``.
    """

    def __init__(
        self,
        client: redis.Redis,
        scripts: Scripts,
        name: str,
        prefix: str = "semaphore",
        url: str = "redis",
        dedupe_window_s: float = DEFAULTS["semaphore_dedupe_window"],
        dropped_after_s: float = DEFAULTS["semaphore_dropped_after"],
        max_dispatches: int = DEFAULTS["semaphore_max_dispatches"],
        history_s: float = DEFAULTS["semaphore_history_ttl"],
        wait_replicas: int = 0,
        cluster: bool = False,
    ) -> None:
        self.client = client
        self.scripts = scripts
        self.name = name
        self.prefix = prefix
        self.url = url
        self.dedupe_window_s = dedupe_window_s
        self.dropped_after_s = dropped_after_s
        self.max_dispatches = max_dispatches
        self.history_ms = int(history_s * 1000)
        #: Replicas each state change must reach before a script's answer is trusted (WAIT).
        self.wait_replicas = wait_replicas
        self.keys = dict(zip(KEY_PARTS, keys_for(prefix, name), strict=True))
        #: On a Redis Cluster the tick's index is another slot's key: the client writes it.
        self.cluster = cluster
        self.keys["index"] = f"{{{prefix}:{name}}}:ticks" if cluster else index_key(prefix)
        self._keys = tuple(self.keys.values())
        #: The group's hash tag, which names it in other groups' dependents lists.
        self.tag = f"{{{prefix}:{name}}}"
        #: The data set this group last saw (see common.lua); a change means Redis lost data.
        self.epoch = ""
        self.recover_ms = 0
        # Whether the last acquire had to keep its call: then the next sends its message.
        self._expect_full = False
        self._calls: dict[str, ScriptCall] = {}

    def __repr__(self) -> str:
        return f"<Group {self.name!r}>"

    def _run(self, script: Any, now_ms: int | None, args: Sequence[Any], task_id: str = "") -> Any:
        now = "" if now_ms is None else str(int(now_ms))
        head = [now, self.epoch, self.recover_ms, self.history_ms]
        acked = None
        try:
            if self.wait_replicas:
                reply, acked = self._run_replicated(script, [*head, *args])
            else:
                reply = self._script_call(script)([*head, *args])
        except redis.TimeoutError as exc:
            # A read timeout: the request may sit in the server's buffer and run later (a
            # stalled server). A connect timeout sent nothing (redis-py says "connecting").
            if task_id and "connecting" not in str(exc):
                raise AcceptanceUnknown(self.url, task_id, exc) from exc
            raise RedisUnavailable(self.url, exc) from exc
        except (redis.ConnectionError, redis.exceptions.ClusterError) as exc:
            # A connection lost after the request went out (a master killed between running
            # the script and answering): a submit may have been accepted.
            if task_id and not _before_sending(exc):
                raise AcceptanceUnknown(self.url, task_id, exc) from exc
            raise RedisUnavailable(self.url, exc) from exc
        self.epoch = as_text(reply[0])
        if acked is not None and acked < self.wait_replicas:
            short = redis.TimeoutError(
                f"the change reached {acked} of {self.wait_replicas} replicas "
                "(semaphore_redis_wait_replicas); a failover now could lose it"
            )
            if task_id:  # a submit: its caller must not take the call for accepted
                raise AcceptanceUnknown(self.url, task_id, short)
            # A start, an end, a tick: done on the master all the same; refusing it now would
            # skip a run Redis recorded.
            logger.warning("gate group %r: %s", self.name, short)
        return reply

    def _script_call(self, script: Any) -> ScriptCall:
        call = self._calls.get(script.sha)
        if call is None:
            call = self._calls[script.sha] = ScriptCall(self.client, script, self._keys)
        return call

    def _run_replicated(self, script: Any, args: list[Any]) -> tuple[Any, int]:
        """Run ``script`` then ``WAIT`` on the same connection (WAIT counts the replicas that
        have that connection's writes): on a cluster, the connection of the group's node."""
        client = self.client
        if self.cluster:
            client = client.get_redis_connection(client.get_node_from_key(self._keys[0]))
        pool = getattr(client, "connection_pool", None)
        timeout = getattr(pool, "connection_kwargs", {}).get("socket_timeout") or 5.0
        for attempt in (1, 2):
            # EVALSHA itself: a script object in a pipeline would first ask SCRIPT EXISTS.
            pipe = client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(self._keys), *self._keys, *args)
            pipe.execute_command("WAIT", self.wait_replicas, int(timeout * 500))
            try:
                reply, acked = pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                client.script_load(script.script)
                continue
            return reply, int(acked)
        raise AssertionError("unreachable")

    def _split(self, rows: Iterable[Any]) -> tuple[list[Reply], list[Malformed]]:
        """A reply's grants and follow-ups; a ``Due`` row goes to the tick's index here."""
        grants, malformed = split_grants(rows)
        due = [g for g in grants if isinstance(g, Due)]
        if due:
            note_due(self.client, self.prefix, self.tag, min(d.ms for d in due))
            grants = [g for g in grants if not isinstance(g, Due)]
        return grants, malformed

    def _lease(self, lease_ms: int) -> int:
        # Recovery after lost data must outlast the longest lease handed out.
        self.recover_ms = max(self.recover_ms, lease_ms)
        return lease_ms

    def acquire(
        self,
        task_id: str,
        call_json: str,
        limits: Sequence[int],
        message: bytes | Any,
        *,
        lease_ms: int,
        delay_ms: int = 0,
        flags: str = "",
        now_ms: int | None = None,
    ) -> Admission:
        """Grant a call the room it needs now, or keep it (with its message) until it may go.

        ``message`` (bytes, or a function that encodes them) is stored only when the call
        waits. While the gate had room the last time, it is not encoded or sent up front;
        should the call have to wait after all, the script writes nothing and asks for it,
        costing one more round trip then. Returns the outcome, the fence (granted, held) or
        the number of parked calls, the limits in force of the call's gates, and calls
        handed room meanwhile (whose start time came).
        """
        self._lease(lease_ms)
        encode = message if callable(message) else (lambda: message)

        def send(payload: bytes) -> Any:
            args = [task_id, call_json, ",".join(map(str, limits)), int(delay_ms), payload, flags]
            reply = self._run(self.scripts.acquire, now_ms, args, task_id)
            code_of("acquire", reply, (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12))
            return reply

        eager = bool(flags) or delay_ms > 0 or not callable(message) or self._expect_full
        reply = send(encode() if eager else b"")
        if int(reply[1]) == 6:  # it has to wait after all: send it again with its message
            payload = encode()
            if not payload:
                raise ValueError(f"call {task_id} must wait in Redis, which needs its message")
            reply = send(payload)
        outcome = Acquired(int(reply[1]))
        self._expect_full = outcome is Acquired.PARKED
        stored = [int(x) if x else 0 for x in as_text(reply[3]).split(",")]
        grants, _ = self._split(reply[5:])
        extra: tuple[Any, ...] = ()
        if reply[4]:
            kind = as_text(reply[4][0])
            extra = (kind, as_text(reply[4][1]), *reply[4][2:])
        return Admission(outcome, int(reply[2]), stored, grants, extra)

    def start(
        self,
        task_id: str,
        runner: str,
        *,
        redeliver: bool = False,
        mode: str = "",
        now_ms: int | None = None,
    ) -> tuple[Started, int, str, bool, list[Reply]]:
        """Mark ``task_id`` running under ``runner``.

        ``redeliver`` says the broker brings the call back if its worker dies (``acks_late``),
        so an expired lease of it is not a dropped call. Returns the verdict, the fence, the
        name of the backend that started the call (``""`` for a gated call), whether calls
        wait for its end (then its result is wanted), and follow-ups (traces). ``mode`` is
        for calls held ahead of their grant (``semaphore_prefetch``): ``"u"`` lets one go (it
        answers ``REPARKED`` for a call that still waits), ``"c"`` is the start of a holder,
        which also takes a run a release granted it (see :meth:`confirm`).
        """
        reply = self._run(self.scripts.start, now_ms, [task_id, runner, int(redeliver), mode])
        verdict = Started(code_of("start", reply, (1, 4, 5, 7, 8, 9)))
        follow, _ = self._split(reply[5:])
        return verdict, int(reply[2]), as_text(reply[3]), bool(int(reply[4])), follow

    def wake_key(self, task_id: str) -> str:
        """The list a worker holding ``task_id`` ahead of its grant waits on (see hold.py);
        ``wake_key`` in lua/common.lua names the same key."""
        return f"{self.tag}:wake:{task_id}"

    def confirm(self, task_id: str, runner: str, *, redeliver: bool = False) -> Callable[[], int]:
        """Confirm, without waiting for the answer, the run a release granted a holder.

        Returns a function that reads the answer (the start's code; call it before the
        call's release). Where the answer cannot be left pending (a Redis Cluster client,
        ``wait_replicas``), the confirmation runs at once.
        """
        call = self._script_call(self.scripts.start)
        args = [task_id, runner, int(redeliver), "c"]
        if self.wait_replicas or call.pool is None:
            code = int(self.start(task_id, runner, redeliver=redeliver, mode="c")[0])
            return lambda: code
        head = ["", self.epoch, self.recover_ms, self.history_ms]
        try:
            conn = call.send([*head, *args])
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RedisUnavailable(self.url, exc) from exc

        def answer() -> int:
            try:
                reply = call.receive(conn)
            except redis.exceptions.NoScriptError:  # a restarted server: it did not run
                reply = self._run(self.scripts.start, None, args)
            self.epoch = as_text(reply[0])
            return code_of("start", reply, (1, 4, 5, 7, 8, 9))

        return answer

    def release(
        self,
        task_id: str,
        fence: int | None = None,
        *,
        state: str = "SUCCEEDED",
        payload: str = "",
        text: str = "",
        now_ms: int | None = None,
    ) -> Release:
        """Give back the hold of ``task_id`` (of grant ``fence`` if given) and hand room on.

        ``state`` says how the call ended (SUCCEEDED, FAILED, CANCELLED, DROPPED), for its
        history and its dependents; ``payload`` is its encoded result or error when dependents
        want it, ``text`` its error as text.
        """
        fence_arg = "" if fence is None else str(int(fence))
        window_ms = int(self.dedupe_window_s * 1000)
        args = [task_id, fence_arg, window_ms, state, payload, text]
        reply = self._run(self.scripts.release, now_ms, args)
        grants, malformed = self._split(reply[4:])
        return Release(bool(int(reply[1])), as_text(reply[2]), as_text(reply[3]), grants, malformed)

    def keepalive(
        self, calls: Mapping[str, Sequence[str]], lease_ms: int, *, now_ms: int | None = None
    ) -> tuple[list[str], dict[str, str]]:
        """Renew the leases of ``{call id: its gates}``.

        Returns the ids that hold nothing any more, and ``{id: backend}`` of the renewed ones
        that a scheduler backend started.
        """
        if not calls:
            return [], {}
        pairs = [x for task_id, gates in calls.items() for x in (task_id, ",".join(gates))]
        reply = self._run(self.scripts.keepalive, now_ms, [self._lease(lease_ms), *pairs])
        kept = reply[2]
        backends = {as_text(kept[i]): as_text(kept[i + 1]) for i in range(0, len(kept), 2)}
        return [as_text(x) for x in reply[1]], backends

    def reclaim(
        self, *, batch: int = 1000, backoff_ms: int = 1000, now_ms: int | None = None
    ) -> Reclaim:
        """Take back expired leases, start calls whose time came, hand room on."""
        args = [
            int(batch),
            int(self.dropped_after_s * 1000),
            self.max_dispatches,
            int(backoff_ms),
            int(self.dedupe_window_s * 1000),
        ]
        reply = self._run(self.scripts.reclaim, now_ms, args)
        reclaimed = [
            Reclaimed(
                as_text(i),
                as_text(s),
                as_text(w),
                int(f),
                as_text(b),
                as_text(n),
                bool(int(a)),
                int(d),
                m if isinstance(m, bytes) else str(m).encode(),
            )
            for i, s, w, f, b, n, a, d, m in reply[1]
        ]
        grants, malformed = self._split(reply[2])
        dropped = [tuple(as_text(x).split(" ", 1)) for x in reply[3]]
        expired = [(as_text(i), int(w) / 1000.0, m, as_text(g)) for i, w, m, g in reply[4]]
        next_due = int(reply[5]) if len(reply) > 5 and reply[5] else None
        pairs = [(d[0], d[-1]) for d in dropped]
        return Reclaim(reclaimed, grants, malformed, pairs, expired, next_due)

    def claim(
        self,
        gate: str,
        slot: int | str,
        task_id: str,
        backend: str,
        *,
        lease_ms: int,
        limit: int,
        now_ms: int | None = None,
    ) -> tuple[Claimed, int]:
        """Give scheduler slot ``slot`` of ``gate`` to ``task_id``, handed over by ``backend``."""
        args = [gate, str(slot), task_id, self._lease(lease_ms), backend, int(limit)]
        reply = self._run(self.scripts.claim, now_ms, args)
        return Claimed(code_of("claim", reply, (1, 9, 10, 11, 12))), int(reply[2])

    def cancel(
        self, task_id: str, *, reason: str = "", who: str = "", now_ms: int | None = None
    ) -> tuple[str, list[Reply]]:
        """Take a call that has not started out of its gates; it will never run.

        Returns the state it was in (``""`` when unknown here, ``"running"`` when it runs:
        nothing was changed then) and the calls handed the room it freed (and the calls that
        required it, cancelled too).
        """
        window_ms = int(self.dedupe_window_s * 1000)
        reply = self._run(self.scripts.cancel, now_ms, [task_id, window_ms, reason, who])
        grants, _ = self._split(reply[3:])
        return as_text(reply[2]), grants

    def link(
        self, requirement: str, dependent_tag: str, dependent: str, *, future: bool = False
    ) -> tuple[int, str, str, str, str]:
        """List ``dependent`` (of the group tagged ``dependent_tag``) as waiting for the end of
        ``requirement`` of this group.

        Returns ``(code, state, payload, error, task)``: code 1 linked (state: the
        requirement's now), 2 it ended already (state: how; the caller settles the dependent),
        3 linked ahead of its send (``future``), 0 unknown here (nothing written).
        """
        reply = self._run(
            self.scripts.link, None, [requirement, dependent_tag, dependent, int(future)]
        )
        code = code_of("link", reply, (0, 1, 2, 3))
        return code, as_text(reply[2]), as_text(reply[3]), as_text(reply[4]), as_text(reply[5])

    def satisfy(
        self,
        dependent: str,
        requirement: str,
        state: str,
        *,
        payload: str = "",
        text: str = "",
        task: str = "",
    ) -> tuple[bool, list[Reply]]:
        """Count the end of ``requirement`` for ``dependent`` of this group; returns whether it
        still waited for it, and the follow-ups (it granted, or ended, and so on)."""
        args = [dependent, requirement, state, payload, text, task]
        reply = self._run(self.scripts.satisfy, None, args)
        follow, _ = self._split(reply[2:])
        return bool(int(reply[1])), follow

    def acknowledge(self, notice: str) -> None:
        """Forget a notice to another group once that group counted it (see the outbox)."""
        self._run(self.scripts.ack, None, [notice])

    def resize(
        self, gate: str, limit: int, *, who: str = "", now_ms: int | None = None
    ) -> tuple[int | None, list[Reply]]:
        """Set the limit in force of ``gate``; returns the old one and calls handed new room.

        ``who`` (host:pid) journals it as an operator's change.
        """
        reply = self._run(self.scripts.resize, now_ms, [gate, int(limit), who])
        old = as_text(reply[1])
        grants, _ = self._split(reply[2:])
        return (int(old) if old else None), grants

    def operate(
        self, op: str, gate: str, arg: str = "", *, who: str, now_ms: int | None = None
    ) -> tuple[list[str], list[Reply]]:
        """An operator's change (see lua/operate.lua): ``pause``, ``resume``, ``key-limit``
        (``arg`` "<key>\\x1f<limit>"), ``purge`` (``arg`` the batch). Returns the ids of the
        calls purged and the calls handed room."""
        reply = self._run(self.scripts.operate, now_ms, [op, gate, arg, who])
        grants, _ = self._split(reply[3:])
        return [as_text(x) for x in reply[2]], grants
