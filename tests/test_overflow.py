"""When the gate is full and across time: max_pending / on_full, wait_timeout, retries.

Real redis-server, real (threads) workers. Every scenario uses the gate ``work`` of limit 1,
held by a call that runs until the test sets a flag, so what waits is known exactly.
"""

from __future__ import annotations

import itertools
import math
import time
import types
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import Celery

from celery_semaphore import GateFull, WaitTimeout, gated, runtime_for
from celery_semaphore import publish as publish_module
from celery_semaphore.group import Group
from celery_semaphore.tick import run_tick

from .conftest import slot_keys, threads_worker, wait_for


def add_tasks(app: Celery, **overflow: Any) -> types.SimpleNamespace:
    """Tasks of gate ``work``: ``hold`` (until a flag), ``call`` (with ``overflow``), more."""
    probe = app.probe  # type: ignore[attr-defined]

    @gated("work")
    @app.task(name="ovf.hold", bind=True, shared=False)
    def hold(self: Any, flag: str) -> str:
        probe.enter(self.request.id)
        try:
            deadline = time.monotonic() + 30
            while not probe.client.exists(probe.key(f"flag:{flag}")):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"flag {flag} never came")
                time.sleep(0.01)
        finally:
            probe.leave(self.request.id)
        return flag

    @gated("work", **overflow)
    @app.task(name="ovf.call", bind=True, shared=False)
    def call(self: Any, tag: str = "") -> str:
        probe.enter(self.request.id)
        probe.leave(self.request.id)
        return tag

    @gated("work", key=lambda tag, *a, **kw: tag[0], max_pending=2, on_full="reject")
    @app.task(name="ovf.keyed", bind=True, shared=False)
    def keyed(self: Any, tag: str) -> str:
        probe.enter(self.request.id)
        probe.leave(self.request.id)
        return tag

    @gated("work", wait_timeout=0.5)
    @app.task(name="ovf.impatient", bind=True, shared=False)
    def impatient(self: Any) -> str:
        probe.enter(self.request.id)
        probe.leave(self.request.id)
        return "ran"

    @gated("work")
    @app.task(name="ovf.other", bind=True, shared=False)
    def other(self: Any) -> str:
        probe.enter(self.request.id)
        try:
            time.sleep(0.1)
        finally:
            probe.leave(self.request.id)
        return "other"

    @gated("work")
    @app.task(name="ovf.retrier", bind=True, shared=False, max_retries=2)
    def retrier(self: Any) -> int:
        retries = int(self.request.retries or 0)
        probe.enter(self.request.id)
        try:
            time.sleep(0.05)
            if retries < 2:
                # Parks behind this run: it can only run while the retry's countdown frees
                # the gate.
                other.apply_async(task_id=f"{self.request.id}.other{retries}")
        finally:
            probe.leave(self.request.id)
        if retries < 2:
            raise self.retry(countdown=0.5)
        return retries

    @gated("work")
    @app.task(name="ovf.retry_first", bind=True, shared=False, max_retries=1)
    def retry_first(self: Any) -> str:
        probe.enter(self.request.id)
        probe.leave(self.request.id)
        if not self.request.retries:
            hold.apply_async(("go",), task_id=f"{self.request.id}.blocker")
            raise self.retry(countdown=0.3)
        return "retried"

    # Arity 3: Celery calls it directly, in whichever process records the failure.
    @app.task(name="ovf.errback", shared=False)
    def errback(request: Any, exc: BaseException, traceback: Any) -> None:
        probe.client.rpush(probe.key("errbacks"), f"{request.id} {type(exc).__name__}")

    return types.SimpleNamespace(
        hold=hold,
        call=call,
        keyed=keyed,
        impatient=impatient,
        other=other,
        retrier=retrier,
        retry_first=retry_first,
        errback=errback,
        probe=probe,
    )


def release(t: types.SimpleNamespace, flag: str = "go") -> None:
    t.probe.client.set(t.probe.key(f"flag:{flag}"), 1)


def errbacks(t: types.SimpleNamespace) -> list[str]:
    return [x.decode() for x in t.probe.client.lrange(t.probe.key("errbacks"), 0, -1)]


def intervals(t: types.SimpleNamespace) -> list[tuple[str, float, float]]:
    """Every run the probe logged, as (task id, start, end), in start order."""
    rows = [x.decode().split() for x in t.probe.client.lrange(t.probe.key("log"), 0, -1)]
    open_: dict[str, float] = {}
    out = []
    for row in rows:
        if row[0] == "start":
            open_[row[1]] = float(row[2])
        else:
            out.append((row[1], open_.pop(row[1]), float(row[2])))
    assert not open_, f"runs without an end: {open_}"
    return sorted(out, key=lambda r: r[1])


def ran(t: types.SimpleNamespace) -> list[str]:
    return sorted(r[0] for r in intervals(t))


def started(t: types.SimpleNamespace, task_id: str) -> bool:
    return any(
        x.decode().startswith(f"start {task_id} ")
        for x in t.probe.client.lrange(t.probe.key("log"), 0, -1)
    )


def snapshot(slots: redis.Redis, prefix: str) -> dict[str, Any]:
    """Every slot key and its content (holders without lease deadlines, which renewals move;
    state hashes without the metrics, which count what happens, refusals included)."""
    out: dict[str, Any] = {}
    for key in slot_keys(slots, prefix):
        kind = slots.type(key).decode()
        if kind == "hash":
            out[key] = {k: v for k, v in slots.hgetall(key).items() if not k.startswith(b"m\x1f")}
        elif kind == "zset" and key.endswith(":holders"):
            out[key] = sorted(slots.zrange(key, 0, -1))
        elif kind == "zset":
            out[key] = slots.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = (kind, slots.dump(key))
    return out


def assert_at_rest(slots: redis.Redis, prefix: str, group: Group) -> None:
    """Only the state hash is left, and the ended set if it has a TTL."""
    wait_for(lambda: group.held() == 0 and group.parked() == 0, 10, "the gate to be free")
    state, ended = f"{{{prefix}:work}}:state", f"{{{prefix}:work}}:ended"
    keys = slot_keys(slots, prefix)
    assert set(keys) - {ended} == {state}
    if ended in keys:
        assert slots.pttl(ended) > 0


def queue_length(app: Celery, prefix: str) -> int:
    with app.connection_for_write() as conn:
        return int(conn.default_channel.client.llen(prefix))


def hold_the_gate(t: types.SimpleNamespace) -> Any:
    holder = t.hold.delay("go")
    wait_for(lambda: started(t, holder.id), 20, "the holder to run")
    return holder


@pytest.mark.parametrize("on_full", ["park", "reject", "drop", "replace"])
def test_each_on_full_policy_with_a_gate_of_one_and_a_cap_of_two(
    make_app: Callable[..., Celery],
    slots: redis.Redis,
    prefix: str,
    on_full: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(publish_module, "_last_warning", {})  # once a minute per process
    app = make_app(limit=1)
    t = add_tasks(app, max_pending=2, on_full=on_full)
    group = runtime_for(app).group("work")
    with threads_worker(app, concurrency=4):
        holder = hold_the_gate(t)
        first = t.call.apply_async(("a",), link_error=t.errback.s())
        second = t.call.apply_async(("b",), link_error=t.errback.s())
        assert (group.held(), group.parked()) == (1, 2)
        before = snapshot(slots, prefix)
        third: Any = None
        if on_full == "reject":
            with pytest.raises(GateFull) as info:
                t.call.apply_async(("c",), task_id="rejected-c", link_error=t.errback.s())
            assert (info.value.gate, info.value.limit, info.value.pending) == ("work", 1, 2)
            assert "'work'" in str(info.value)
            # Nothing stored anywhere: not in the gate, not in the broker, no result.
            assert snapshot(slots, prefix) == before
            assert app.AsyncResult("rejected-c").state == "PENDING"
        else:
            third = t.call.apply_async(("c",), link_error=t.errback.s())
        fourth: Any = None
        if on_full == "park":
            fourth = t.call.apply_async(("d",))
            assert group.parked() == 4
            # Over the cap it only warns, once a minute.
            warnings = [r for r in caplog.records if "max_pending" in r.getMessage()]
            assert len(warnings) == 1
            assert third.id in warnings[0].getMessage()
        if on_full == "drop":
            # At once, before any room came: FAILURE with GateFull, link_error ran, not kept.
            assert third.state == "FAILURE"
            assert isinstance(third.result, GateFull)
            assert (third.result.gate, third.result.limit, third.result.pending) == ("work", 1, 2)
            assert errbacks(t) == [f"{third.id} GateFull"]
            assert snapshot(slots, prefix) == before
        if on_full == "replace":
            # The oldest parked call of the gate (it has no keys) made way for the newest.
            assert first.state == "REVOKED"
            assert "replaced" in str(first.result)
            assert third.id in str(first.result)
            assert group.parked() == 2
            assert group.record(first.id) is None
        release(t)
        assert holder.get(timeout=20) == "go"
        expected = {
            "park": [first, second, third, fourth],
            "reject": [first, second],
            "drop": [first, second],
            "replace": [second, third],
        }[on_full]
        assert [r.get(timeout=20) for r in expected] == [
            {first.id: "a", second.id: "b", getattr(fourth, "id", ""): "d"}.get(r.id, "c")
            for r in expected
        ]
        assert_at_rest(slots, prefix, group)
        assert queue_length(app, prefix) == 0
    assert ran(t) == sorted([holder.id, *(r.id for r in expected)])
    assert t.probe.value("peak") == 1
    if on_full == "drop":
        assert third.state == "FAILURE"  # never overwritten by a run
    if on_full == "replace":
        assert first.state == "REVOKED"
    assert errbacks(t) == ([f"{third.id} GateFull"] if on_full == "drop" else [])
    assert_at_rest(slots, prefix, group)


def test_replace_takes_the_oldest_waiting_call_whatever_its_priority(
    make_app: Callable[..., Celery], slots: redis.Redis, prefix: str
) -> None:
    app = make_app(limit=1)
    t = add_tasks(app, max_pending=2, on_full="replace")
    group = runtime_for(app).group("work")
    with threads_worker(app, concurrency=4):
        holder = hold_the_gate(t)
        first, second = t.call.delay("a"), t.call.delay("b")
        urgent = t.call.apply_async(("c",), priority=5)
        assert (first.state, group.parked()) == ("REVOKED", 2)
        assert urgent.id in str(first.result)
        last = t.call.delay("d")  # the oldest waiting one now is the second, at priority 0
        assert (second.state, group.parked()) == ("REVOKED", 2)
        assert last.id in str(second.result)
        release(t)
        assert [urgent.get(timeout=20), last.get(timeout=20)] == ["c", "d"]
        assert_at_rest(slots, prefix, group)
    assert [r[0] for r in intervals(t)] == [holder.id, urgent.id, last.id]
    assert (first.state, second.state) == ("REVOKED", "REVOKED")


def test_the_cap_counts_per_key_and_per_call_options_override_the_decorator(
    make_app: Callable[..., Celery], slots: redis.Redis, prefix: str
) -> None:
    app = make_app(limit=1)
    t = add_tasks(app)
    group = runtime_for(app).group("work")
    with threads_worker(app, concurrency=4):
        holder = hold_the_gate(t)
        a1, a2, b1, b2 = (t.keyed.delay(tag) for tag in ("a1", "a2", "b1", "b2"))
        # Four parked over a cap of 2: the cap is per key.
        assert group.parked() == 4
        before = snapshot(slots, prefix)
        with pytest.raises(GateFull) as info:
            t.keyed.delay("a3")
        assert (info.value.gate, info.value.limit, info.value.pending) == ("work", 1, 2)
        with pytest.raises(GateFull):
            t.keyed.delay("b3")
        assert snapshot(slots, prefix) == before
        # Per call: replace within the key (b1 goes, the a calls stay) ...
        b3 = t.keyed.apply_async(("b3",), on_full="replace")
        assert b1.state == "REVOKED"
        assert "replaced" in str(b1.result)
        assert (group.record(a1.id) is not None, group.parked()) == (True, 4)
        # ... a higher cap parks it, drop ends it at once.
        a3 = t.keyed.apply_async(("a3",), max_pending=3)
        a4 = t.keyed.apply_async(("a4",), max_pending=3, on_full="drop")
        assert a4.state == "FAILURE"
        assert isinstance(a4.result, GateFull)
        assert a4.result.pending == 3
        assert group.parked() == 5
        # A task without overflow options takes them per call; it has no key, so its cap
        # counts the parked calls of the gate without a key.
        c1, c2 = t.call.delay("c1"), t.call.delay("c2")
        with pytest.raises(GateFull) as info:
            t.call.apply_async(("x",), max_pending=2, on_full="reject")
        assert info.value.pending == 2
        dropped = t.call.apply_async(
            ("y",), max_pending=2, on_full="drop", link_error=t.errback.s()
        )
        assert dropped.state == "FAILURE"
        assert errbacks(t) == [f"{dropped.id} GateFull"]
        parked = t.call.apply_async(("z",), max_pending=3, on_full="reject")
        assert group.parked() == 8
        release(t)
        finished = [a1, a2, b2, b3, a3, c1, c2, parked]
        assert sorted(r.get(timeout=20) for r in finished) == sorted(
            ["a1", "a2", "b2", "b3", "a3", "c1", "c2", "z"]
        )
        assert_at_rest(slots, prefix, group)
    assert ran(t) == sorted([holder.id, *(r.id for r in finished)])
    assert t.probe.value("peak") == 1
    assert b1.state == "REVOKED"
    assert a4.state == "FAILURE"


def test_a_call_parked_longer_than_its_wait_timeout_fails_with_wait_timeout(
    make_app: Callable[..., Celery], slots: redis.Redis, prefix: str
) -> None:
    app = make_app(limit=1, semaphore_tick_interval=0.5)
    rt = runtime_for(app)
    t = add_tasks(app)
    group = rt.group("work")
    with threads_worker(app, concurrency=4):
        holder = hold_the_gate(t)
        by_decorator = t.impatient.apply_async(link_error=t.errback.s())
        by_call = t.call.apply_async(("p",), wait_timeout=0.5, link_error=t.errback.s())
        keeper = t.call.apply_async(("k",))  # no wait_timeout: it waits for good
        assert group.parked() == 3
        # The tick expires them: run it as beat would, only more often.
        wait_for(
            lambda: run_tick(rt) is not None and by_decorator.ready() and by_call.ready(),
            10,
            "the wait timeouts",
        )
        for result in (by_decorator, by_call):
            assert result.state == "FAILURE"
            exc = result.result
            assert isinstance(exc, WaitTimeout)
            assert (exc.gate, exc.task_id) == ("work", result.id)
            # Within one tick interval of the deadline (the tick ran every few ms here).
            assert 0.5 <= exc.waited_s < 1.0
            assert "'work'" in str(exc)
            assert f"{exc.waited_s:.1f} s" in str(exc)
        assert sorted(errbacks(t)) == sorted(
            [f"{by_decorator.id} WaitTimeout", f"{by_call.id} WaitTimeout"]
        )
        assert group.parked() == 1
        release(t)
        assert keeper.get(timeout=20) == "k"
        assert_at_rest(slots, prefix, group)
    assert ran(t) == sorted([holder.id, keeper.id])
    assert by_decorator.state == by_call.state == "FAILURE"


def test_a_retry_gives_the_slot_back_for_its_countdown(
    make_app: Callable[..., Celery], slots: redis.Redis, prefix: str
) -> None:
    app = make_app(limit=1, semaphore_tick_interval=0.5)
    rt = runtime_for(app)
    t = add_tasks(app)
    group = rt.group("work")
    with threads_worker(app, concurrency=4):
        result = t.retrier.delay()
        # The tick promotes the retry when its countdown is over.
        wait_for(lambda: run_tick(rt) is not None and result.ready(), 20, "the retries")
        assert result.state == "SUCCESS"
        assert result.get() == 2
        assert_at_rest(slots, prefix, group)
    runs = intervals(t)
    attempts = [(s, e) for task_id, s, e in runs if task_id == result.id]
    others = {task_id: (s, e) for task_id, s, e in runs if task_id != result.id}
    assert len(attempts) == 3
    assert sorted(others) == [f"{result.id}.other0", f"{result.id}.other1"]
    for n in (0, 1):
        # The other call of the gate of 1 ran inside the countdown of retry n.
        other_start, other_end = others[f"{result.id}.other{n}"]
        assert attempts[n][1] <= other_start < other_end <= attempts[n + 1][0]
    # Never two units: nothing overlapped, ever.
    assert t.probe.value("peak") == 1
    for (_, _, end), (_, start, _) in itertools.pairwise(runs):
        assert end <= start


def test_a_retry_competes_again_ahead_of_newer_calls_of_its_priority(
    make_app: Callable[..., Celery], slots: redis.Redis, prefix: str
) -> None:
    app = make_app(limit=1, semaphore_tick_interval=0.5)
    rt = runtime_for(app)
    t = add_tasks(app)
    group = rt.group("work")
    with threads_worker(app, concurrency=4):
        result = t.retry_first.delay()
        blocker = f"{result.id}.blocker"
        # The blocker got the gate the retry gave back; newer calls park behind it.
        wait_for(lambda: started(t, blocker), 20, "the blocker to run")
        newer = [t.call.delay(tag) for tag in ("n1", "n2")]
        assert (group.parked(), group.waiting()) == (2, 1)
        wait_for(
            lambda: run_tick(rt) is not None and group.waiting() == 0,
            10,
            "the retry's countdown to end",
        )
        assert group.record(result.id)["state"] == "parked"
        release(t)
        assert result.get(timeout=20) == "retried"
        assert [r.get(timeout=20) for r in newer] == ["n1", "n2"]
        assert_at_rest(slots, prefix, group)
    assert [r[0] for r in intervals(t)] == [result.id, blocker, result.id, *(r.id for r in newer)]


BAD_OPTIONS = [
    ("max_pending", 0),
    ("max_pending", "2"),
    ("on_full", "explode"),
    ("wait_timeout", 0),
    ("wait_timeout", -1),
    ("wait_timeout", math.nan),
]


@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS)
def test_bad_overflow_options_are_refused_naming_gate_and_option(
    make_app: Callable[..., Celery], slots: redis.Redis, prefix: str, option: str, value: Any
) -> None:
    app = make_app(limit=1)
    t = add_tasks(app)
    with pytest.raises((ValueError, TypeError)) as info:
        gated("work", **{option: value})
    assert "'work'" in str(info.value)
    assert option in str(info.value)
    t.call.delay("first")  # granted: the next one would have to wait
    before = snapshot(slots, prefix)
    queued = queue_length(app, prefix)
    with pytest.raises((ValueError, TypeError)) as info:
        t.call.apply_async(("second",), task_id="bad-call", **{option: value})
    assert "'work'" in str(info.value)
    assert option in str(info.value)
    assert snapshot(slots, prefix) == before
    assert queue_length(app, prefix) == queued == 1
    assert app.AsyncResult("bad-call").state == "PENDING"
