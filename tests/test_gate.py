"""The Lua scripts through Group, against a real redis-server, with the clock driven by the test.

Release order and what a call needs: priorities, start times, per-key limits, stacked gates,
weights, fairness between keys; and the life of a hold (grant, start, release, reclaim).
"""

from __future__ import annotations

import collections
import random
import threading
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_semaphore.errors import RedisUnavailable
from celery_semaphore.group import Acquired, Group, Started, keys_for
from celery_semaphore.scripts import Scripts
from celery_semaphore.spec import CallSpec

from .conftest import acquire, at_rest, slot_keys

T0 = 1_700_000_000_000  # a fixed "now" in ms; every call below passes an explicit clock
LEASE_MS = 10_000


@pytest.fixture
def group(slots: redis.Redis, prefix: str) -> Group:
    return Group(slots, Scripts(slots), "g", prefix=prefix, history_s=0)


def send(
    group: Group,
    task_id: str,
    *,
    limit: int = 2,
    now_ms: int = T0,
    message: bytes | None = None,
    **call: Any,
) -> tuple[Acquired, int, list[int], list[Any]]:
    """Send call ``task_id`` to gate ``g`` (its message names it); the first four answers."""
    admission = acquire(
        group, task_id, message if message is not None else f"m-{task_id}".encode(),
        gate="g", limit=limit, lease_s=LEASE_MS / 1000, now_ms=now_ms, **call,
    )  # fmt: skip
    return tuple(admission)[:4]  # type: ignore[return-value]


def stacked(group: Group, task_id: str, gates: tuple[str, ...], **call: Any) -> Any:
    """Send a call that needs ``gates`` of the group (api: limit 2, db: limit 1)."""
    limits = {"api": 2, "db": 1}
    n = len(gates)
    return send(
        group, task_id, gates=gates, limits=[limits[g] for g in gates], keys=("",) * n,
        weights=(1,) * n, key_limits=(0,) * n, **call,
    )  # fmt: skip


def in_turn(group: Group, first: str, now_ms: int = T0) -> list[str]:
    """Release ``first`` and then each call it was handed to; returns the hand-off order."""
    order, current = [], first
    while True:
        grants = group.release(current, now_ms=now_ms).grants
        if not grants:
            return order
        assert len(grants) == 1
        current = grants[0].task_id
        order.append(current)


# -- grant, release, hand-off ------------------------------------------------------------


def test_acquire_grants_up_to_the_limit_then_parks(group: Group) -> None:
    assert send(group, "a") == (Acquired.GRANTED, 1, [2], [])
    assert send(group, "b")[:2] == (Acquired.GRANTED, 2)
    assert send(group, "c")[:2] == (Acquired.PARKED, 1)
    assert send(group, "d")[:2] == (Acquired.PARKED, 2)
    assert (group.held(), group.parked(), group.used("g")) == (2, 2, 2)


def test_release_hands_the_room_to_the_head_of_the_line_in_the_same_step(group: Group) -> None:
    for call in "abcd":
        send(group, call)
    out = group.release("a", now_ms=T0 + 1)
    assert out.released is True
    assert [(g.task_id, g.fence, g.message) for g in out.grants] == [("c", 3, b"m-c")]
    assert out.malformed == []
    assert group.holders() == {"b": T0 + LEASE_MS, "c": T0 + 1 + LEASE_MS}
    assert (group.parked(), group.used("g")) == (1, 2)


def test_releasing_twice_or_with_a_stale_fence_frees_nothing(group: Group) -> None:
    fence = send(group, "a")[1]
    send(group, "b")
    assert group.release("a", fence + 1, now_ms=T0).released is False
    assert group.used("g") == 2
    assert group.release("a", fence, now_ms=T0).released is True
    assert group.release("a", fence, now_ms=T0).released is False
    assert group.release("a", now_ms=T0).released is False
    assert (group.held(), group.used("g")) == (1, 1)


def test_an_immediate_retry_keeps_its_hold_and_its_next_start_is_not_a_duplicate(
    group: Group,
) -> None:
    fence = send(group, "a")[1]
    assert group.start("a", "w1", now_ms=T0)[:3] == (Started.RUN, fence, "")
    held = send(group, "a", flags="r", now_ms=T0 + 5)
    assert held[:2] == (Acquired.HELD, fence)
    assert group.start("a", "w2", now_ms=T0 + 10)[:3] == (Started.RUN, fence, "")
    assert (group.held(), group.used("g")) == (1, 1)


def test_a_retry_with_a_countdown_gives_its_hold_back_and_competes_again_at_its_old_place(
    group: Group,
) -> None:
    fence = send(group, "a", limit=1)[1]
    group.start("a", "w1", now_ms=T0)
    assert send(group, "b", limit=1, now_ms=T0 + 1)[0] is Acquired.PARKED
    # a retries with a countdown: its unit goes to b at once, a waits without holding any.
    assert send(group, "a", limit=1, flags="r", delay_ms=60_000, now_ms=T0 + 5)[0] is (
        Acquired.WAITING
    )
    assert list(group.holders()) == ["b"] and group.record("a")["state"] == "waiting"
    assert send(group, "c", limit=1, now_ms=T0 + 6)[0] is Acquired.PARKED
    # Due while b runs: a joins the line ahead of c, which was sent after a first was.
    group.start("b", "w2", now_ms=T0 + 7)
    grants = group.release("b", now_ms=T0 + 60_005).grants
    assert [g.task_id for g in grants] == ["a"] and grants[0].fence > fence
    assert group.start("a", "w3", now_ms=T0 + 60_006)[0] is Started.RUN
    assert [g.task_id for g in group.release("a", now_ms=T0 + 60_007).grants] == ["c"]


def test_a_second_send_of_a_pending_call_writes_nothing(group: Group) -> None:
    send(group, "a")
    send(group, "b")
    send(group, "c")
    # a was granted at its first send: this one publishes a copy (its first may be lost).
    assert send(group, "a")[:2] == (Acquired.RESENT, group.record("a")["fence"])
    assert send(group, "c")[:2] == (Acquired.DUPLICATE, 0)
    assert (group.held(), group.parked(), group.used("g")) == (2, 1, 2)


def test_a_second_live_execution_of_one_call_is_a_duplicate(group: Group) -> None:
    send(group, "a")
    assert group.start("a", "w1", now_ms=T0)[0] is Started.RUN
    verdict = group.start("a", "w2", now_ms=T0 + 1)[0]
    assert verdict is Started.DUPLICATE
    assert not verdict.runs


def test_fences_only_grow_across_grants_and_hand_offs(group: Group) -> None:
    seen = [fence for i in range(6) if (fence := send(group, f"c{i}")[1]) and i < 2]
    for i in range(6):
        seen += [g.fence for g in group.release(f"c{i}", now_ms=T0).grants]
    assert seen == sorted(seen)
    assert len(set(seen)) == len(seen) == 6


def test_a_call_that_holds_nothing_is_told_to_go_through_the_gate_again(group: Group) -> None:
    assert group.start("x", "w1", now_ms=T0)[:3] == (Started.LOST, 0, "")
    send(group, "a")
    group.start("a", "w1", now_ms=T0)
    group.release("a", now_ms=T0)
    # A call seen once leaves no trace after its end: a later copy is unknown, not "ended".
    assert group.start("a", "w1", now_ms=T0 + 1)[0] is Started.LOST
    assert group.client.exists(group.keys["ended"]) == 0


def test_a_late_copy_of_a_call_delivered_twice_is_refused_after_its_end(group: Group) -> None:
    send(group, "a")
    group.start("a", "w1", now_ms=T0)
    assert group.start("a", "w2", now_ms=T0 + 1)[0] is Started.DUPLICATE
    assert group.release("a", now_ms=T0 + 2).released is True
    # A third copy (a visibility-timeout redelivery) arrives after the call ended.
    assert group.start("a", "w3", now_ms=T0 + 3)[0] is Started.ENDED
    # The memory of it is kept for the dedupe window only: the set expires with it...
    assert 0 < group.client.pttl(group.keys["ended"]) <= 3_600_000
    # ...and entries older than the window leave it when a new one arrives.
    later = T0 + 3 + 3_600_001
    send(group, "b", now_ms=later)
    group.start("b", "w1", now_ms=later)
    group.start("b", "w2", now_ms=later)
    group.release("b", now_ms=later)
    assert group.client.zrange(group.keys["ended"], 0, -1) == [b"b"]


# -- leases: keepalive, reclaim, calls that never start ----------------------------------


def test_keepalive_extends_leases_and_names_the_calls_that_lost_theirs(group: Group) -> None:
    send(group, "a")
    assert group.keepalive({"a": ["g"], "gone": ["g"]}, LEASE_MS, now_ms=T0 + 9_000) == (
        ["gone"],
        {},
    )
    assert group.holders()["a"] == T0 + 19_000
    assert group.reclaim(now_ms=T0 + LEASE_MS + 1).reclaimed == []
    assert group.used("g") == 1


def test_reclaim_takes_back_expired_leases_only_and_hands_the_room_on(group: Group) -> None:
    send(group, "old")
    group.start("old", "w1", now_ms=T0)
    send(group, "new", now_ms=T0 + 5_000)
    send(group, "next", now_ms=T0 + 5_000)
    out = group.reclaim(now_ms=T0 + LEASE_MS + 1)
    assert [(r.task_id, r.state, r.runner) for r in out.reclaimed] == [("old", "running", "w1")]
    assert [(g.task_id, g.message) for g in out.grants] == [("next", b"m-next")]
    assert set(group.holders()) == {"new", "next"}
    assert group.used("g") == 2


def test_a_handed_off_call_that_never_started_waits_a_backoff_behind_the_calls_after_it(
    group: Group,
) -> None:
    send(group, "a", limit=1)
    for call in "bcd":
        send(group, call, limit=1)
    assert [g.task_id for g in group.release("a", now_ms=T0).grants] == ["b"]
    # Whoever should have published b died: its lease expires with b never started.
    out = group.reclaim(backoff_ms=3_000, now_ms=T0 + LEASE_MS + 1)
    assert [(r.task_id, r.state, r.dispatches) for r in out.reclaimed] == [("b", "waiting", 1)]
    # Meanwhile the call behind it goes first.
    assert [g.task_id for g in out.grants] == ["c"]
    record = group.record("b")
    assert (record["state"], record["ready_ms"]) == ("waiting", T0 + LEASE_MS + 1 + 3_000)
    assert (group.waiting(), group.used("g")) == (1, 1)
    # Once its backoff has passed it competes again, behind d, with its message intact.
    due = T0 + LEASE_MS + 1 + 3_000
    assert group.reclaim(now_ms=due).grants == []
    assert [g.task_id for g in group.release("c", now_ms=due).grants] == ["d"]
    grants = group.release("d", now_ms=due).grants
    assert [(g.task_id, g.message) for g in grants] == [("b", b"m-b")]
    assert group.start("b", "w1", now_ms=due)[0] is Started.RUN


def test_a_call_handed_room_max_dispatches_times_without_starting_is_abandoned(
    slots: redis.Redis, prefix: str
) -> None:
    group = Group(slots, Scripts(slots), "g", prefix=prefix, max_dispatches=2, history_s=0)
    send(group, "a", limit=1)
    send(group, "b", limit=1)
    group.release("a", now_ms=T0)
    now = T0 + LEASE_MS + 1
    out = group.reclaim(backoff_ms=1_000, now_ms=now)
    assert [(r.task_id, r.state, r.dispatches) for r in out.reclaimed] == [("b", "waiting", 1)]
    # Its backoff passed: handed room again (second dispatch), and again it never starts.
    now += 1_000
    assert [g.task_id for g in group.reclaim(now_ms=now).grants] == ["b"]
    out = group.reclaim(now_ms=now + LEASE_MS + 1)
    assert [(r.task_id, r.state, r.dispatches, r.message) for r in out.reclaimed] == [
        ("b", "abandoned", 2, b"m-b")
    ]
    assert (group.held(), group.parked(), group.waiting(), group.used("g")) == (0, 0, 0, 0)
    # A copy that turns up later is refused.
    assert group.start("b", "w1", now_ms=now + LEASE_MS + 2)[0] is Started.ENDED


def test_a_late_copy_of_a_waiting_call_runs_only_if_it_fits(group: Group) -> None:
    send(group, "a", limit=1)
    send(group, "b", limit=1)
    group.release("a", now_ms=T0)
    now = T0 + LEASE_MS + 1
    group.reclaim(now_ms=now)  # b never started: it waits again
    send(group, "c", limit=1, now_ms=now)
    assert group.start("b", "w1", now_ms=now)[0] is Started.REPARKED
    group.release("c", now_ms=now)
    verdict, fence, *_ = group.start("b", "w1", now_ms=now + 1)
    assert (verdict, group.used("g"), group.waiting()) == (Started.RUN, 1, 0)
    assert group.release("b", fence, now_ms=now + 2).released is True
    assert group.used("g") == 0


def test_a_dead_runner_without_redelivery_is_reported_dropped_after_the_grace_only(
    slots: redis.Redis, prefix: str
) -> None:
    group = Group(slots, Scripts(slots), "g", prefix=prefix, dropped_after_s=60, history_s=0)
    send(group, "early-ack")
    group.start("early-ack", "host:1", now_ms=T0)
    send(group, "late-ack")
    group.start("late-ack", "host:2", redeliver=True, now_ms=T0)
    out = group.reclaim(now_ms=T0 + LEASE_MS + 1)
    assert sorted((r.task_id, r.redeliver) for r in out.reclaimed) == [
        ("early-ack", False),
        ("late-ack", True),
    ]
    assert out.dropped == []
    assert group.reclaim(now_ms=T0 + LEASE_MS + 1 + 59_000).dropped == []
    assert group.reclaim(now_ms=T0 + LEASE_MS + 1 + 60_000).dropped == [("early-ack", "host:1")]
    assert group.reclaim(now_ms=T0 + LEASE_MS + 1 + 61_000).dropped == []
    assert slots.exists(group.keys["suspect"]) == 0


def test_a_refused_copy_is_kept_as_a_backup_and_dropped_when_the_call_ends(group: Group) -> None:
    send(group, "a")
    group.start("a", "w1", now_ms=T0)
    fence = group.record("a")["fence"]
    assert send(group, "a", message=b"copy", flags="b", now_ms=T0 + 1)[:2] == (
        Acquired.BACKED_UP,
        fence,
    )
    assert (group.held(), group.parked(), group.used("g")) == (1, 0, 1)
    group.release("a", now_ms=T0 + 2)
    assert group.client.hlen(group.keys["messages"]) == 0
    # A copy that arrives after the end is dropped, not parked.
    assert send(group, "a", message=b"late", flags="b", now_ms=T0 + 3)[0] is Acquired.DROPPED
    assert (group.held(), group.parked()) == (0, 0)


def test_a_backup_runs_when_the_execution_it_waited_for_dies(group: Group) -> None:
    send(group, "a")
    group.start("a", "killed-child", now_ms=T0)
    send(group, "a", message=b"copy", flags="b", now_ms=T0 + 1)
    now = T0 + LEASE_MS + 1
    out = group.reclaim(now_ms=now)
    assert [(r.task_id, r.state, r.runner) for r in out.reclaimed] == [
        ("a", "running", "killed-child")
    ]
    # The copy is handed the room in the same step instead of the call being dropped.
    assert [(g.task_id, g.message) for g in out.grants] == [("a", b"copy")]
    verdict, fence, *_ = group.start("a", "new-child", now_ms=now + 1)
    assert verdict is Started.RUN
    assert group.release("a", fence, now_ms=now + 2).released is True
    # It ran twice in all: a third copy is refused, and nothing reports the call dropped.
    assert group.start("a", "w3", now_ms=now + 3)[0] is Started.ENDED
    assert group.reclaim(now_ms=now + 120_000).dropped == []


# -- the clock, the keys, lost data ------------------------------------------------------


def test_leases_are_measured_on_the_redis_clock(group: Group) -> None:
    server_s, server_us = group.client.time()
    acquire(group, "a", b"m", gate="g", limit=2, lease_s=LEASE_MS / 1000)
    server_ms = server_s * 1000 + server_us // 1000
    deadline = group.holders()["a"]
    assert server_ms + LEASE_MS <= deadline <= server_ms + LEASE_MS + 1_000


def test_every_key_of_a_group_shares_one_hash_tag() -> None:
    keys = keys_for("semaphore", "crawler")
    assert {key.split("}")[0] for key in keys} == {"{semaphore:crawler"}
    assert len(keys) == len(set(keys)) == 22


def test_a_group_at_rest_keeps_only_its_state_hash(
    group: Group, slots: redis.Redis, prefix: str
) -> None:
    for call in "abcdef":
        send(group, call, keys=("k",), key_limits=(1,), priority=ord(call) % 3)
    send(group, "later", delay_ms=1_000)
    holders = list(group.holders())
    while holders:
        task_id = holders.pop(0)
        group.start(task_id, "w", now_ms=T0 + 1_000)
        out = group.release(task_id, now_ms=T0 + 1_000)
        holders += [g.task_id for g in out.grants]
    assert (group.held(), group.parked(), group.waiting(), group.used("g")) == (0, 0, 0, 0)
    assert slot_keys(slots, prefix) == at_rest(prefix, "g")


def test_a_fresh_group_is_not_mistaken_for_lost_data(group: Group) -> None:
    assert send(group, "a")[0] is Acquired.GRANTED
    assert group.epoch == str(T0)


def test_a_flushed_redis_is_detected_and_the_group_admits_no_one_until_the_lease_passes(
    group: Group,
) -> None:
    send(group, "a")
    group.start("a", "w1", now_ms=T0)
    send(group, "b")
    old_epoch = group.epoch
    group.client.delete(*group.keys.values())  # Redis restarted empty, or someone flushed it
    # Two calls run on; a new caller must not take their room.
    assert send(group, "c", now_ms=T0 + 100)[0] is Acquired.PARKED
    assert group.epoch != old_epoch
    # A running call re-registers through its keepalive and is counted again.
    assert group.keepalive({"a": ["g"]}, LEASE_MS, now_ms=T0 + 200) == ([], {})
    assert group.used("g") == 1
    assert group.reclaim(now_ms=T0 + 300).grants == []
    # Once the longest lease has passed, the group works normally again.
    grants = group.reclaim(now_ms=T0 + 100 + LEASE_MS + 1).grants
    assert [g.task_id for g in grants] == ["c"]
    assert group.used("g") == 2


def test_an_unreachable_redis_raises_an_error_naming_the_url() -> None:
    client = redis.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    group = Group(client, Scripts(client), "g", url="redis://127.0.0.1:1/0")
    with pytest.raises(RedisUnavailable, match=r"redis://127\.0\.0\.1:1/0"):
        acquire(group, "a", b"m", gate="g")
    with pytest.raises(RedisUnavailable, match=r"redis://127\.0\.0\.1:1/0"):
        group.used("g")


# -- cancel and malformed entries --------------------------------------------------------


def test_cancel_takes_out_a_call_in_every_state_before_its_run(group: Group) -> None:
    send(group, "running")
    group.start("running", "w1", now_ms=T0)
    send(group, "granted")
    send(group, "parked")
    send(group, "next")
    send(group, "waiting", delay_ms=5_000)
    assert group.cancel("running", now_ms=T0) == ("running", [])
    assert group.cancel("waiting", now_ms=T0) == ("waiting", [])
    assert group.cancel("parked", now_ms=T0) == ("parked", [])
    state, grants = group.cancel("granted", now_ms=T0)
    assert (state, [g.task_id for g in grants]) == ("granted", ["next"])
    assert group.cancel("unknown", now_ms=T0) == ("", [])
    # A copy of a cancelled call already sent to the broker is refused at its start.
    assert group.start("granted", "w1", now_ms=T0 + 1)[0] is Started.ENDED
    assert (group.held(), group.parked(), group.waiting(), group.used("g")) == (2, 0, 0, 2)


def test_a_malformed_parked_entry_is_moved_aside_and_the_next_call_served(group: Group) -> None:
    send(group, "a")
    send(group, "b")
    send(group, "junk")
    send(group, "c")
    group.client.hset(group.keys["calls"], "junk", "not json")
    out = group.release("a", now_ms=T0)
    assert [m.task_id for m in out.malformed] == ["junk"]
    assert [g.task_id for g in out.grants] == ["c"]
    assert group.client.hexists(group.keys["calls"], "junk") == 0
    assert group.aside()["junk"].startswith(b"not json")
    assert (group.held(), group.parked(), group.used("g")) == (2, 0, 2)


def test_a_malformed_holder_is_reclaimed_and_moved_aside(group: Group) -> None:
    send(group, "a")
    send(group, "b")
    group.client.hset(group.keys["calls"], "b", "{broken")
    out = group.reclaim(now_ms=T0 + LEASE_MS + 1)
    assert sorted((r.task_id, r.state) for r in out.reclaimed) == [
        ("a", "granted"),
        ("b", "malformed"),
    ]
    assert "b" in group.aside()


# -- priorities ---------------------------------------------------------------------------


def test_a_gate_of_one_serves_the_highest_priority_first_and_fifo_within_a_priority(
    group: Group,
) -> None:
    send(group, "blocker", limit=1)
    rng = random.Random(1)
    priorities = [rng.choice((0, 1, 5, 9, 128, 255)) for _ in range(60)]
    for i, priority in enumerate(priorities):
        assert send(group, f"c{i}", limit=1, priority=priority)[0] is Acquired.PARKED
    expected = [f"c{i}" for i in sorted(range(60), key=lambda i: (-priorities[i], i))]
    assert in_turn(group, "blocker") == expected


def test_a_high_priority_call_sent_later_overtakes_the_waiting_low_priority_ones(
    group: Group,
) -> None:
    send(group, "blocker", limit=1)
    for i in range(3):
        send(group, f"low{i}", limit=1, priority=0)
    grants = group.release("blocker", now_ms=T0).grants
    assert [g.task_id for g in grants] == ["low0"]
    send(group, "high", limit=1, priority=200)
    assert in_turn(group, "low0") == ["high", "low1", "low2"]


# -- start times --------------------------------------------------------------------------


def test_a_delayed_call_takes_no_room_and_nothing_hands_it_room_before_its_time(
    group: Group,
) -> None:
    assert send(group, "later", limit=1, delay_ms=5_000) == (Acquired.WAITING, 0, [1], [])
    assert (group.used("g"), group.waiting(), group.parked(), group.held()) == (0, 1, 0, 0)
    # The room is free for others meanwhile.
    assert send(group, "now", limit=1)[0] is Acquired.GRANTED
    assert group.release("now", now_ms=T0 + 4_999).grants == []
    assert group.reclaim(now_ms=T0 + 4_999).grants == []
    assert send(group, "other", limit=1, now_ms=T0 + 4_999)[0] is Acquired.GRANTED
    assert group.record("later")["state"] == "waiting"


@pytest.mark.parametrize("promoter", ["release", "acquire", "reclaim"])
def test_a_delayed_call_competes_from_its_time_on_whichever_script_runs_first(
    group: Group, promoter: str
) -> None:
    send(group, "later", limit=1, delay_ms=5_000)
    due = T0 + 5_000
    if promoter == "release":
        send(group, "holder", limit=1)
        grants = group.release("holder", now_ms=due).grants
    elif promoter == "acquire":
        outcome, _, _, grants = send(group, "next", limit=1, now_ms=due)
        # The call whose time came is ahead of one sent at that very moment.
        assert outcome is Acquired.PARKED
    else:
        grants = group.reclaim(now_ms=due).grants
    assert [(g.task_id, g.message) for g in grants] == [("later", b"m-later")]
    assert group.holders() == {"later": due + LEASE_MS}
    assert (group.waiting(), group.used("g")) == (0, 1)


def test_a_delayed_call_whose_time_came_waits_in_line_for_room(group: Group) -> None:
    send(group, "holder", limit=1)
    send(group, "first", limit=1)
    send(group, "later", limit=1, delay_ms=5_000)
    due = T0 + 5_000
    assert group.reclaim(now_ms=due).grants == []
    assert (group.waiting(), group.parked(), group.used("g")) == (0, 2, 1)
    assert in_turn(group, "holder", now_ms=due) == ["first", "later"]


# -- per-key limits -------------------------------------------------------------------------


def test_each_key_holds_at_most_its_key_limit_and_an_overridden_key_its_own(
    group: Group, slots: redis.Redis, prefix: str
) -> None:
    key_limits = {"a": 2, "b": 2, "vip": 3}
    for i in range(8):
        for key, cap in key_limits.items():
            send(group, f"{key}{i}", limit=10, keys=(key,), key_limits=(cap,))
    # Full keys wait; the gate itself (10) is not what holds them back.
    assert group.key_usage() == {("g", "a"): 2, ("g", "b"): 2, ("g", "vip"): 3}
    assert group.used("g") == 7
    peak: collections.Counter[str] = collections.Counter()
    holders = collections.deque(group.holders())
    started = set(holders)
    rng = random.Random(2)
    while holders:
        holders.rotate(rng.randrange(len(holders)))
        out = group.release(holders.popleft(), now_ms=T0)
        holders.extend(g.task_id for g in out.grants)
        started.update(g.task_id for g in out.grants)
        for (gate, key), used in group.key_usage().items():
            assert gate == "g"
            assert used <= key_limits[key]
            peak[key] = max(peak[key], used)
    assert dict(peak) == key_limits
    assert len(started) == 24
    # The key data leaves Redis with the last call.
    assert group.key_usage() == {}
    assert slot_keys(slots, prefix) == at_rest(prefix, "g")


def test_a_gate_with_per_key_limits_only_admits_every_key_up_to_its_own_limit(
    group: Group,
) -> None:
    for i in range(3):
        for key in "vwxyz":
            send(group, f"{key}{i}", limit=-1, keys=(key,), key_limits=(1,))
    assert group.limit("g") == -1
    assert group.used("g") == 5
    assert set(group.key_usage().values()) == {1}
    assert group.parked() == 10


def test_a_full_key_does_not_hold_back_the_calls_of_other_keys(group: Group) -> None:
    for i in range(5):
        send(group, f"busy{i}", limit=3, keys=("busy",), key_limits=(1,))
    assert send(group, "quiet", limit=3, keys=("quiet",), key_limits=(1,))[0] is Acquired.GRANTED
    assert group.used("g") == 2
    assert [g.task_id for g in group.release("busy0", now_ms=T0).grants] == ["busy1"]


# -- stacked gates --------------------------------------------------------------------------


def test_a_stacked_call_waits_holding_nothing_while_one_of_its_gates_is_full(
    group: Group,
) -> None:
    assert stacked(group, "db-only", ("db",))[0] is Acquired.GRANTED
    assert stacked(group, "both", ("api", "db"))[0] is Acquired.PARKED
    assert (group.used("api"), group.used("db")) == (0, 1)
    # The other gate's room stays usable by calls that need only it.
    assert stacked(group, "api-only", ("api",))[0] is Acquired.GRANTED
    assert (group.used("api"), group.used("db")) == (1, 1)
    grants = group.release("db-only", now_ms=T0).grants
    assert [g.task_id for g in grants] == ["both"]
    assert (group.used("api"), group.used("db")) == (2, 1)


def test_stacked_gates_are_never_held_in_part_and_each_reaches_exactly_its_limit(
    group: Group, slots: redis.Redis, prefix: str
) -> None:
    limits = {"api": 2, "db": 1}
    kinds = [("api", "db"), ("api",), ("db",)]
    rng = random.Random(3)
    needs = {f"c{i}": rng.choice(kinds) for i in range(90)}
    for task_id, gates in needs.items():
        stacked(group, task_id, gates)
    peak: collections.Counter[str] = collections.Counter()
    holders = list(group.holders())
    done: set[str] = set()
    while holders:
        # Every unit held belongs to a call that holds all of its gates: no partial hold.
        for gate, limit in limits.items():
            used = group.used(gate)
            assert used == sum(gate in needs[h] for h in holders) <= limit
            peak[gate] = max(peak[gate], used)
        for task_id in needs:
            state = group.record(task_id)["state"] if task_id not in done else "done"
            assert (state == "granted") == (task_id in holders)
        task_id = holders.pop(rng.randrange(len(holders)))
        holders += [g.task_id for g in group.release(task_id, now_ms=T0).grants]
        done.add(task_id)
    assert dict(peak) == limits
    assert done == set(needs)
    assert slot_keys(slots, prefix) == at_rest(prefix, "g")


# -- weights --------------------------------------------------------------------------------


def test_weights_sum_to_the_limit_at_peak_and_never_above_it(group: Group) -> None:
    rng = random.Random(4)
    weights = {f"c{i}": rng.choice((1, 2, 3, 4)) for i in range(60)}
    for task_id, weight in weights.items():
        send(group, task_id, limit=4, weights=(weight,))
    holders = list(group.holders())
    peak, done = 0, 0
    while holders:
        used = group.used("g")
        assert used == sum(weights[h] for h in holders) <= 4
        peak = max(peak, used)
        holders += [
            g.task_id
            for g in group.release(holders.pop(rng.randrange(len(holders))), now_ms=T0).grants
        ]
        done += 1
    assert peak == 4
    assert done == 60


def test_a_heavy_head_keeps_the_free_units_so_light_calls_behind_it_do_not_overtake(
    group: Group,
) -> None:
    for i in range(4):
        send(group, f"light{i}", limit=4, keys=(f"l{i}",))
    # Other lanes (other keys) at the same priority: only the head-of-line rule orders them.
    assert send(group, "heavy", limit=4, keys=("h",), weights=(3,))[0] is Acquired.PARKED
    for i in range(4, 8):
        assert send(group, f"light{i}", limit=4, keys=(f"l{i}",))[0] is Acquired.PARKED
    assert group.release("light0", now_ms=T0).grants == []
    assert group.release("light1", now_ms=T0).grants == []
    assert group.used("g") == 2
    assert [g.task_id for g in group.release("light2", now_ms=T0).grants] == ["heavy"]
    assert group.used("g") == 4
    assert [g.task_id for g in group.release("light3", now_ms=T0).grants] == ["light4"]


# -- fairness between keys ------------------------------------------------------------------


def test_a_small_key_is_served_in_turn_with_a_big_key_backlog(group: Group) -> None:
    limit = 4

    def call_json(key: str) -> str:
        return CallSpec((key,), (1,), (0,), 0, LEASE_MS, False).to_json(("g",))

    # The big backlog is built with the acquire script pipelined (10,000 round trips would be
    # slow); the small key's calls go through Group.acquire as usual.
    big = call_json("big")
    pipe = group.client.pipeline(transaction=False)
    for i in range(10_000):
        head = [T0, group.epoch, LEASE_MS, 0]
        args = [*head, f"big{i}", big, str(limit), 0, b"m", ""]
        group.scripts.acquire(keys=list(group.keys.values()), args=args, client=pipe)
    replies = pipe.execute()
    assert [int(r[1]) for r in replies[:5]] == [1, 1, 1, 1, 0]
    assert (group.used("g"), group.parked()) == (limit, 10_000 - limit)
    for i in range(10):
        assert send(group, f"small{i}", limit=limit, keys=("small",))[0] is Acquired.PARKED
    holders = collections.deque(group.holders())
    small_started, big_started = 0, 0
    while small_started < 10:
        grants = group.release(holders.popleft(), now_ms=T0).grants
        holders.extend(g.task_id for g in grants)
        small_started += sum(g.task_id.startswith("small") for g in grants)
        big_started += sum(g.task_id.startswith("big") for g in grants)
    assert big_started <= 10 + 2 * limit


# -- limits in force ----------------------------------------------------------------------


def test_a_lowered_limit_stops_new_grants_at_once_and_a_raised_one_hands_out_at_once(
    group: Group,
) -> None:
    for i in range(6):
        send(group, f"c{i}", limit=3)
    assert group.resize("g", 1, now_ms=T0) == (3, [])
    assert group.limit("g") == 1
    # Nothing running is stopped; nothing new starts until the gate is under the new limit.
    assert group.release("c0", now_ms=T0).grants == []
    assert group.release("c1", now_ms=T0).grants == []
    assert send(group, "late", limit=3)[0] is Acquired.PARKED
    assert [g.task_id for g in group.release("c2", now_ms=T0).grants] == ["c3"]
    assert group.used("g") == 1
    old, grants = group.resize("g", 3, now_ms=T0)
    assert (old, [g.task_id for g in grants]) == (1, ["c4", "c5"])
    assert (group.used("g"), group.parked()) == (3, 1)


def test_a_process_configured_with_another_limit_does_not_change_the_stored_one(
    group: Group,
) -> None:
    assert send(group, "a", limit=2)[:3] == (Acquired.GRANTED, 1, [2])
    outcome, _, stored, _ = send(group, "b", limit=5)
    assert (outcome, stored) == (Acquired.GRANTED, [2])
    assert send(group, "c", limit=5)[:3] == (Acquired.PARKED, 1, [2])
    assert group.limit("g") == 2
    assert group.used("g") == 2


# -- concurrency --------------------------------------------------------------------------


def test_racing_clients_never_hold_more_than_the_limit(slots: redis.Redis, prefix: str) -> None:
    limit, peak, errors = 3, [0], []

    def client(n: int) -> None:
        own = redis.Redis(connection_pool=slots.connection_pool)
        group = Group(own, Scripts(own), "race", prefix=prefix, history_s=0)
        try:
            for i in range(150):
                call = f"{n}-{i}"
                outcome = acquire(group, call, b"m", gate="race", limit=limit)[0]
                used = group.used("race")
                assert used <= limit
                peak[0] = max(peak[0], used)
                # A parked call may have been handed room meanwhile: cancel frees it then.
                if outcome is Acquired.GRANTED:
                    group.release(call)
                else:
                    group.cancel(call)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert peak[0] == limit
    group = Group(slots, Scripts(slots), "race", prefix=prefix, history_s=0)
    assert (group.used("race"), group.held(), group.parked()) == (0, 0, 0)


def test_a_hold_granted_to_a_waiter_that_died_is_given_up_at_its_first_expiry(
    slots: redis.Redis, prefix: str
) -> None:
    g = Group(slots, Scripts(slots), "g", prefix=prefix, history_s=0)
    acquire(g, "a", b"m", gate="g", limit=1, lease_s=10, now_ms=T0)
    acquire(g, "lock-x", b"semaphore-lock:lock-x", gate="g", limit=1, lease_s=10, now_ms=T0)
    acquire(g, "b", b"mb", gate="g", limit=1, lease_s=10, now_ms=T0)
    assert [x.task_id for x in g.release("a", now_ms=T0 + 1).grants] == ["lock-x"]
    # Its process died waiting: at the lease's end the room goes on, nothing is sent again.
    out = g.reclaim(now_ms=T0 + 20_000)
    assert [(r.task_id, r.state) for r in out.reclaimed] == [("lock-x", "lock-expired")]
    assert [x.task_id for x in out.grants] == ["b"]
    assert g.record("lock-x") is None and g.waiting() == 0
