"""The fault-test project: gated tasks that record every run, for crash and chaos tests.

Subprocess workers and beat load the module-level ``app`` (``celery -A tests.faultproj``),
configured from ``CS_*`` environment variables (see :func:`app_from_env`); the tests build the
same app in process from the same variables. Every run of a task of the semaphore ``work``
appends JSON events to a probe list in its own Redis database:

- ``prerun`` / ``postrun``: every delivery that reached ``task_prerun`` / ``task_postrun`` (a
  refused duplicate included; ``postrun`` follows everything the package did about the run);
- ``start`` / ``end``: the body began / finished (``end`` is written in ``finally``, before the
  slot is released), with the fence, the process id and the attempt number.

A run that was killed has a ``start`` and no ``end``; the tests end it at the kill.
"""

from __future__ import annotations

import json
import os
import signal
import time
import zlib
from typing import Any

import redis
from celery import Celery, group, signals

from celery_semaphore import current_fence, gated, holds_slot
from celery_semaphore.group import Group
from celery_semaphore.message import Envelope
from celery_semaphore.worker import process_alive

from .proj import base_app

GATE = "work"
#: The gate stacked on ``work`` in the ``keyed`` shape.
AUX = "aux"


def key_of(*args: Any, **kwargs: Any) -> str:
    """The key of a fault call in the ``keyed`` shape: one of three, from its first argument."""
    return f"k{zlib.crc32(repr(args[:1]).encode()) % 3}"


class Probe:
    """The event log and flags of one test, in the probe database."""

    def __init__(self, url: str, prefix: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"fprobe:{self.prefix}:{name}"

    def record(self, event: str, task_id: str, **fields: Any) -> None:
        entry = {"ev": event, "id": task_id, "t": time.time(), "pid": os.getpid(), **fields}
        self.client.rpush(self.key("log"), json.dumps(entry))

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        rows = [json.loads(raw) for raw in self.client.lrange(self.key("log"), 0, -1)]
        return [r for r in rows if event is None or r["ev"] == event]

    def watch(self, pid: int) -> None:
        """Have every later ``start`` record whether process ``pid`` is still alive."""
        self.client.sadd(self.key("watch"), pid)

    def watched(self) -> dict[str, list[int]]:
        """The watched processes, and those of them alive now (a zombie counts as dead)."""
        pids = sorted(int(x) for x in self.client.smembers(self.key("watch")))
        return {"watched": pids, "alive": [p for p in pids if process_alive(p)]}

    def set_flag(self, name: str) -> None:
        self.client.set(self.key(f"flag:{name}"), 1)

    def flag(self, name: str) -> bool:
        return bool(self.client.exists(self.key(f"flag:{name}")))


def create_app(
    name: str,
    *,
    broker: str,
    backend: str,
    slots_url: str,
    probe_url: str,
    prefix: str,
    queue: str,
    limit: int = 1,
    beta: bool = False,
    shape: str = "plain",
    heavy_calls: bool = False,
    key_limit: int | None = None,
    aux_limit: int | None = None,
    **conf: Any,
) -> Celery:
    """Build an app whose tasks share the semaphore ``work`` of size ``limit``.

    With ``beta``, two tasks of a gate ``beta`` whose limit is only in the decorator, too.
    """
    # Fail fast on an unreachable Redis, and no prefetch beyond the run (kills hit one task).
    settings = {"semaphore_redis_timeout": 2.0, "worker_prefetch_multiplier": 1, **conf}
    if shape == "keyed":
        settings["semaphore_groups"] = {GATE: GATE, AUX: GATE}
    key_limit = key_limit or limit
    aux_limit = aux_limit or limit
    app = base_app(
        name, broker=broker, backend=backend, slots_url=slots_url, prefix=prefix, queue=queue,
        limit=limit, **settings,
    )  # fmt: skip
    probe = Probe(probe_url, prefix)
    app.probe = probe  # type: ignore[attr-defined]

    def work_gate() -> Any:
        """The gate of the fault tasks: ``work`` alone, or (shape ``keyed``) ``work`` with a
        key, a key limit and weights, stacked with ``aux`` in the same group."""
        if shape != "keyed":
            return gated(GATE)

        def stack(task: Any) -> Any:
            keyed = gated(GATE, key=key_of, key_limit=key_limit, weight=weight_of)
            return keyed(gated(AUX, limit=aux_limit)(task))

        return stack

    def weight_of(*args: Any, **kwargs: Any) -> int:
        # With heavy calls on (the soak), calls of a multiple of 5 ms take two units; else one,
        # so the fault tests' expected orders hold in the keyed shape too.
        first = args[0] if args else None
        heavy = isinstance(first, (int, float)) and int(first) % 5 == 0
        return 2 if heavy and heavy_calls else 1

    def begin(task: Any) -> None:
        req = task.request
        probe.record(
            "start",
            req.id,
            fence=current_fence(),
            attempt=req.retries or 0,
            **probe.watched(),
        )

    def finish(task: Any, **fields: Any) -> None:
        probe.record("end", task.request.id, **fields)

    @work_gate()
    @app.task(name="fault.sleep", bind=True, shared=False)
    def sleep(self: Any, ms: float = 20) -> float:
        begin(self)
        try:
            time.sleep(ms / 1000.0)
        finally:
            finish(self)
        return ms

    @work_gate()
    @app.task(name="fault.hang", bind=True, shared=False, default_retry_delay=0.3)
    def hang(self: Any, flag: str, max_s: float = 30.0) -> str:
        """Run until the test sets ``flag`` (or ``max_s`` passed)."""
        begin(self)
        try:
            deadline = time.monotonic() + max_s
            while not probe.flag(flag) and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            finish(self)
        return "done"

    @work_gate()
    @app.task(name="fault.fail", bind=True, shared=False)
    def fail(self: Any) -> None:
        begin(self)
        try:
            raise RuntimeError("boom")
        finally:
            finish(self)

    @work_gate()
    @app.task(name="fault.retry_once", bind=True, shared=False, max_retries=3)
    def retry_once(self: Any, ms: float = 100) -> int:
        begin(self)
        try:
            time.sleep(ms / 1000.0)
        finally:
            finish(self)
        if self.request.retries == 0:
            raise self.retry(countdown=0.3)
        return int(self.request.retries)

    @work_gate()
    @app.task(name="fault.soft_limit", bind=True, shared=False, soft_time_limit=0.5)
    def soft_limit(self: Any) -> None:
        begin(self)
        try:
            time.sleep(10)
        finally:
            finish(self)

    @work_gate()
    @app.task(name="fault.hard_limit", bind=True, shared=False, time_limit=1)
    def hard_limit(self: Any) -> None:
        begin(self)
        try:
            time.sleep(10)
        finally:
            finish(self)

    @work_gate()
    @app.task(name="fault.outlive_lease", bind=True, shared=False)
    def outlive_lease(self: Any, flag: str, max_s: float = 30.0) -> dict[str, Any]:
        """Run past its lease (on a pool without keepalive), then ask whether it still holds it."""
        begin(self)
        try:
            deadline = time.monotonic() + max_s
            while not probe.flag(flag) and time.monotonic() < deadline:
                time.sleep(0.02)
            lost = not holds_slot()
        finally:
            finish(self)
        return {"fence": current_fence(), "lease_lost": lost}

    @work_gate()
    @app.task(name="fault.retry_after", bind=True, shared=False, max_retries=3)
    def retry_after(self: Any, countdown: float, queue: str | None = None) -> int:
        begin(self)
        finish(self)
        if self.request.retries == 0:
            raise self.retry(countdown=countdown, queue=queue)
        return int(self.request.retries)

    # A workflow node: its requirements' results arrive as the first argument. Late acks and
    # reject-on-worker-lost on the task itself, so a killed run is redelivered whatever the
    # app's settings; ``flag`` makes it run until the test sets it (a run sure to be killed).
    @work_gate()
    @app.task(
        name="fault.step", bind=True, shared=False, acks_late=True, reject_on_worker_lost=True
    )
    def step(
        self: Any, *inputs: Any, name: str = "", ms: float = 50, flag: str = "", max_s: float = 30.0
    ) -> str:
        begin(self)
        try:
            deadline = time.monotonic() + max_s
            while flag and not probe.flag(flag) and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(ms / 1000.0)
        finally:
            finish(self, got=list(inputs))
        return name

    # A task a scheduler slot starts (TaskBackend): not @gated, it runs under the slot's header.
    @app.task(name="fault.job", bind=True, shared=False)
    def job(self: Any, flag: str, max_s: float = 30.0) -> str:
        begin(self)
        try:
            deadline = time.monotonic() + max_s
            while not probe.flag(flag) and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            finish(self)
        return "done"

    # Task.replace, gated and plain: a nesting of replacements under one id, and chains.
    def nest_body(self: Any, depth: int, acc: Any = ()) -> list[Any]:
        begin(self)
        finish(self)
        acc = [*acc, depth]
        if depth <= 0:
            return acc
        raise self.replace(self.si(depth - 1, acc))

    def nest_chain_body(self: Any, depth: int, acc: list[Any], tag: Any) -> list[Any]:
        begin(self)
        finish(self)
        acc = [*acc, depth]
        if depth <= 0:
            return acc
        raise self.replace(self.si(depth - 1, acc) | tag.s(f"c{depth}"))

    def nest_group_body(self: Any, depth: int, tag: Any) -> list[Any]:
        begin(self)
        finish(self)
        if depth <= 0:
            return [0]
        raise self.replace(group(self.si(depth - 1), tag.si([depth], "g")))

    def tag_body(self: Any, acc: list[Any], marker: str) -> list[Any]:
        begin(self)
        finish(self)
        return [*acc, marker]

    for suffix, wrap in (("", gated(GATE)), ("_plain", lambda t: t)):
        tag_task = wrap(app.task(name=f"fault.tag{suffix}", bind=True, shared=False)(tag_body))

        def nest_chain(self: Any, depth: int, acc: list[Any] = [], _tag: Any = tag_task) -> Any:  # noqa: B006
            return nest_chain_body(self, depth, acc, _tag)

        def nest_group(self: Any, depth: int, _tag: Any = tag_task) -> Any:
            return nest_group_body(self, depth, _tag)

        wrap(app.task(name=f"fault.nest{suffix}", bind=True, shared=False)(nest_body))
        wrap(app.task(name=f"fault.nest_group{suffix}", bind=True, shared=False)(nest_group))
        wrap(app.task(name=f"fault.nest_chain{suffix}", bind=True, shared=False)(nest_chain))

    if beta:  # only where a test asks: the tick would visit the gate "beta" too
        # Gate "beta" with its limit only in the decorator, placed above and below @app.task.
        @gated("beta", limit=2)
        @app.task(name="fault.beta_above", bind=True, shared=False)
        def beta_above(self: Any, ms: float = 50) -> float:
            begin(self)
            try:
                time.sleep(ms / 1000.0)
            finally:
                finish(self)
            return ms

        @app.task(name="fault.beta_below", bind=True, shared=False)
        @gated("beta", limit=2)
        def beta_below(self: Any, ms: float = 50) -> float:
            begin(self)
            try:
                time.sleep(ms / 1000.0)
            finally:
                finish(self)
            return ms

    def on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
        if task is not None and task.app is app and task.name.startswith("fault."):
            info = task.request.delivery_info or {}
            probe.record("prerun", task_id or "", redelivered=bool(info.get("redelivered")))

    def on_postrun(task_id: str | None = None, task: Any = None, **kw: Any) -> None:
        if task is not None and task.app is app and task.name.startswith("fault."):
            probe.record("postrun", task_id or "", state=kw.get("state"))

    # weak=False: the receivers live as long as the app, in the worker and in the test.
    signals.task_prerun.connect(on_prerun, weak=False, dispatch_uid=f"faultproj.prerun.{id(app)}")
    signals.task_postrun.connect(
        on_postrun, weak=False, dispatch_uid=f"faultproj.postrun.{id(app)}"
    )
    return app


def app_from_env(env: os._Environ[str] | dict[str, str]) -> Celery:
    """The app a subprocess worker or beat loads, from ``CS_*`` variables."""
    conf: dict[str, Any] = {
        "semaphore_tick_interval": float(env.get("CS_TICK", "0.5")),
        "semaphore_lease": float(env.get("CS_LEASE", "1.5")),
        # How long a reclaimed early-ack call may still deliver a result before it is dropped.
        "semaphore_dropped_after": float(env.get("CS_DROPPED_AFTER", "1.0")),
        "task_acks_late": env.get("CS_ACKS_LATE") == "1",
        "task_reject_on_worker_lost": env.get("CS_REJECT_ON_LOST") == "1",
        "task_retry_on_worker_lost": env.get("CS_RETRY_ON_LOST") == "1",
        "semaphore_max_dispatches": int(env.get("CS_MAX_DISPATCHES", "5")),
        "semaphore_limit_source": env.get("CS_LIMIT_SOURCE", "redis"),
        "semaphore_redis_timeout": float(env.get("CS_REDIS_TIMEOUT", "2.0")),
        "semaphore_broker_push": env.get("CS_BROKER_PUSH", "1") == "1",
        "semaphore_prefetch": int(env.get("CS_PREFETCH", "0")),
    }
    if env.get("CS_VISIBILITY"):
        # Kombu's sweep of unacked messages: every second instead of every 100 s.
        conf["broker_transport_options"] = {
            "visibility_timeout": float(env["CS_VISIBILITY"]),
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        }
    return create_app(
        "faultproj",
        broker=env["CS_BROKER"],
        backend=env["CS_BACKEND"],
        slots_url=env["CS_SLOTS"],
        probe_url=env["CS_PROBE"],
        prefix=env["CS_PREFIX"],
        queue=env["CS_QUEUE"],
        limit=int(env.get("CS_LIMIT", "1")),
        beta=env.get("CS_BETA") == "1",
        shape=env.get("CS_SHAPE", "plain"),
        heavy_calls=env.get("CS_HEAVY") == "1",
        key_limit=int(env.get("CS_KEY_LIMIT", "0")) or None,
        aux_limit=int(env.get("CS_AUX_LIMIT", "0")) or None,
        **conf,
    )


def crash_on_next_publish(probe: Probe) -> None:
    """Make this process die (SIGKILL) in the next publish of a gated call the test arms.

    The test arms it with ``probe.set_flag("crash-publish")``; the flag is taken atomically,
    so exactly one publish, in whichever process comes first, dies.
    """
    original = Envelope.publish

    def publish(self: Envelope, producer: Any, declare: list[Any]) -> Any:
        if probe.client.delete(probe.key("flag:crash-publish")):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, producer, declare)

    Envelope.publish = publish  # type: ignore[method-assign]


def crash_after_next_script(probe: Probe, method: str) -> None:
    """Make this process die (SIGKILL) right after the next ``Group.<method>`` script the test
    arms with ``probe.set_flag("crash-after-script")`` returned: whatever the script did is
    done, nothing after it in this process is."""
    original = getattr(Group, method)

    def run(self: Group, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if probe.client.delete(probe.key("flag:crash-after-script")):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(Group, method, run)


if "CS_BROKER" in os.environ:
    app = app_from_env(os.environ)
    if os.environ.get("CS_CRASH_PUBLISH") == "1":
        crash_on_next_publish(app.probe)  # type: ignore[attr-defined]
    if os.environ.get("CS_CRASH_AFTER"):
        crash_after_next_script(app.probe, os.environ["CS_CRASH_AFTER"])  # type: ignore[attr-defined]
else:
    app = Celery("faultproj-unconfigured")
