"""The Lua scripts through Gate, against a real redis-server, with the clock driven by the test."""

from __future__ import annotations

import threading

import pytest
import redis

from celery_semaphore.errors import RedisUnavailable
from celery_semaphore.gate import Acquired, Claimed, Gate, Started, keys_for
from celery_semaphore.scripts import Scripts

from .conftest import at_rest, slot_keys

T0 = 1_700_000_000_000  # a fixed "now" in ms; every call below passes an explicit clock


@pytest.fixture
def gate(slots: redis.Redis, prefix: str) -> Gate:
    return Gate(slots, Scripts(slots), "g", 2, lease_s=10, prefix=prefix)


def test_acquire_grants_up_to_the_limit_then_parks(gate: Gate) -> None:
    assert gate.acquire("a", b"ma", now_ms=T0) == (Acquired.GRANTED, 1)
    assert gate.acquire("b", b"mb", now_ms=T0) == (Acquired.GRANTED, 2)
    assert gate.acquire("c", b"mc", now_ms=T0) == (Acquired.PARKED, 1)
    assert gate.acquire("d", b"md", now_ms=T0) == (Acquired.PARKED, 2)
    assert gate.held() == 2
    assert gate.parked() == 2


def test_a_free_slot_is_not_taken_while_calls_wait_ahead(gate: Gate) -> None:
    gate.acquire("a", b"", now_ms=T0)
    gate.acquire("b", b"", now_ms=T0)
    gate.acquire("c", b"mc", now_ms=T0)
    gate.client.zrem(gate.keys[1], "a")  # a slot frees without a hand-off (as after a crash)
    assert gate.acquire("e", b"me", now_ms=T0)[0] is Acquired.PARKED


def test_release_hands_the_slot_to_the_oldest_parked_call_in_the_same_step(gate: Gate) -> None:
    for call in "abcd":
        gate.acquire(call, f"m{call}".encode(), now_ms=T0)
    out = gate.release("a", now_ms=T0 + 1)
    released, grants, malformed = out.released, out.grants, out.malformed
    assert released is True
    assert out.slot == "1"
    assert [(g.task_id, g.message) for g in grants] == [("c", b"mc")]
    assert grants[0].fence == 3
    assert malformed == []
    assert gate.holders() == {"b": T0 + 10_000, "c": T0 + 1 + 10_000}
    assert gate.parked() == 1


def test_releasing_twice_or_with_a_stale_fence_frees_nothing(gate: Gate) -> None:
    _, fence = gate.acquire("a", b"", now_ms=T0)
    gate.acquire("b", b"", now_ms=T0)
    assert gate.release("a", fence + 1, now_ms=T0).released is False
    assert gate.held() == 2
    assert gate.release("a", fence, now_ms=T0).released is True
    assert gate.release("a", fence, now_ms=T0).released is False
    assert gate.release("a", now_ms=T0).released is False
    assert gate.held() == 1


def test_a_retry_of_a_holder_keeps_its_slot_and_its_next_start_is_not_a_duplicate(
    gate: Gate,
) -> None:
    _, fence = gate.acquire("a", b"", now_ms=T0)
    assert gate.start("a", "w1", now_ms=T0)[:2] == (Started.RUN, fence)
    assert gate.acquire("a", b"", delay_ms=60_000, now_ms=T0 + 5) == (Acquired.HELD, fence)
    # The countdown is covered: the lease runs from the retry's ETA.
    assert gate.holders()["a"] == T0 + 5 + 60_000 + 10_000
    assert gate.start("a", "w2", now_ms=T0 + 60_005)[:2] == (Started.RUN, fence)
    assert gate.held() == 1


def test_a_second_live_execution_of_one_call_is_a_duplicate(gate: Gate) -> None:
    gate.acquire("a", b"", now_ms=T0)
    assert gate.start("a", "w1", now_ms=T0)[0] is Started.RUN
    verdict, _, _ = gate.start("a", "w2", now_ms=T0 + 1)
    assert verdict is Started.DUPLICATE
    assert not verdict.runs


def test_fences_only_grow_per_gate(gate: Gate) -> None:
    seen = []
    for i in range(6):
        _, fence = gate.acquire(f"c{i}", b"m", now_ms=T0)
        if fence and i < 2:
            seen.append(fence)
    for i in range(6):
        seen += [g.fence for g in gate.release(f"c{i}", now_ms=T0).grants]
    assert seen == sorted(seen)
    assert len(set(seen)) == len(seen) == 6


def test_reclaim_takes_back_expired_leases_only(gate: Gate) -> None:
    gate.acquire("old", b"", now_ms=T0)
    gate.start("old", "w1", now_ms=T0)
    gate.acquire("new", b"", now_ms=T0 + 5_000)
    gate.acquire("waiting", b"mw", now_ms=T0 + 5_000)
    reclaimed, grants, _, _ = gate.reclaim(now_ms=T0 + 10_001)
    assert [(r.task_id, r.state, r.runner) for r in reclaimed] == [("old", "r", "w1")]
    assert [g.task_id for g in grants] == ["waiting"]
    assert set(gate.holders()) == {"new", "waiting"}


def test_reclaim_parks_again_a_handed_off_call_that_never_started(gate: Gate) -> None:
    gate.acquire("a", b"", now_ms=T0)
    gate.acquire("b", b"", now_ms=T0)
    for call in "cde":
        gate.acquire(call, f"m{call}".encode(), now_ms=T0)
    assert [g.task_id for g in gate.release("a", now_ms=T0).grants] == ["c"]
    # The worker that should have published c died; b finished later and d took its slot.
    assert [g.task_id for g in gate.release("b", now_ms=T0 + 5_000).grants] == ["d"]
    reclaimed, regrants, _, _ = gate.reclaim(now_ms=T0 + 10_001)
    assert [(r.task_id, r.state) for r in reclaimed] == [("c", "parked")]
    # c went back to its old place, ahead of e, with its message intact.
    assert [(g.task_id, g.message) for g in regrants] == [("c", b"mc")]
    assert set(gate.holders()) == {"c", "d"}
    assert gate.parked() == 1


def test_a_late_copy_of_a_re_parked_call_takes_a_free_slot_and_leaves_the_queue(gate: Gate) -> None:
    gate.acquire("a", b"", now_ms=T0)
    gate.acquire("b", b"", now_ms=T0)
    gate.acquire("c", b"mc", now_ms=T0)
    gate.release("a", now_ms=T0)
    gate.client.zadd(gate.keys[1], {"b": T0})  # b's lease is about to expire too
    gate.reclaim(now_ms=T0 + 10_001)  # c re-parked (never started), b reclaimed, c re-granted
    gate.release("c", now_ms=T0 + 10_002)
    assert gate.parked() == 0


def test_keepalive_extends_leases_and_names_the_calls_that_lost_theirs(gate: Gate) -> None:
    gate.acquire("a", b"", now_ms=T0)
    assert gate.keepalive(["a", "gone"], now_ms=T0 + 9_000) == (["gone"], {})
    assert gate.holders()["a"] == T0 + 19_000
    assert gate.reclaim(now_ms=T0 + 10_001)[0] == []


def test_a_call_that_lost_its_slot_takes_a_free_one_or_is_told_to_queue_again(gate: Gate) -> None:
    assert gate.start("x", "w1", now_ms=T0)[0] is Started.REGRANTED
    gate.acquire("y", b"", now_ms=T0)
    assert gate.start("z", "w1", now_ms=T0)[:2] == (Started.LOST, 0)
    assert gate.held() == 2


def test_leases_are_measured_on_the_redis_clock(gate: Gate) -> None:
    server_s, server_us = gate.client.time()
    gate.acquire("a", b"")
    server_ms = server_s * 1000 + server_us // 1000
    deadline = gate.holders()["a"]
    assert server_ms + 10_000 <= deadline <= server_ms + 10_000 + 1_000


def test_a_gate_at_rest_keeps_only_its_state_hash(
    gate: Gate, slots: redis.Redis, prefix: str
) -> None:
    for call in "abcdef":
        gate.acquire(call, b"m", now_ms=T0)
    for call in "abcdef":
        for g in gate.release(call, now_ms=T0).grants:
            gate.start(g.task_id, "w", now_ms=T0)
    assert slot_keys(slots, prefix) == at_rest(prefix, "g")


def test_every_key_of_a_gate_shares_one_hash_tag() -> None:
    tags = {key.split("}")[0] for key in keys_for("semaphore", "crawler")}
    assert tags == {"{semaphore:crawler"}
    assert len(keys_for("semaphore", "crawler")) == 10


def test_cancel_removes_a_parked_call_only(gate: Gate) -> None:
    gate.acquire("a", b"", now_ms=T0)
    gate.acquire("b", b"", now_ms=T0)
    gate.acquire("c", b"mc", now_ms=T0)
    assert gate.cancel("a") is False
    assert gate.cancel("c") is True
    assert gate.parked() == 0
    assert gate.release("a", now_ms=T0).grants == []


def test_a_malformed_parked_entry_is_moved_out_of_the_queue(gate: Gate) -> None:
    gate.acquire("a", b"", now_ms=T0)
    gate.acquire("b", b"", now_ms=T0)
    gate.client.zadd(gate.keys[3], {"junk": 0})
    gate.client.hset(gate.keys[2], "junk", "not json")
    gate.acquire("c", b"mc", now_ms=T0)
    out = gate.release("a", now_ms=T0)
    assert [m.task_id for m in out.malformed] == ["junk"]
    assert [g.task_id for g in out.grants] == ["c"]
    assert gate.client.hexists(gate.keys[2], "junk") == 0
    assert gate.aside()["junk"].startswith(b"not json")


def test_racing_clients_never_hold_more_slots_than_the_limit(
    slots: redis.Redis, prefix: str
) -> None:
    limit, peak, errors = 3, [0], []

    def client(n: int) -> None:
        own = redis.Redis(connection_pool=slots.connection_pool)
        g = Gate(own, Scripts(own), "race", limit, lease_s=10, prefix=prefix)
        try:
            for i in range(150):
                call = f"{n}-{i}"
                outcome, _ = g.acquire(call, b"m")
                held = g.held()
                peak[0] = max(peak[0], held)
                # A parked call may have been handed a slot meanwhile: then cancel finds
                # nothing parked and the call releases the slot it was given.
                if outcome is Acquired.GRANTED or not g.cancel(call):
                    g.release(call)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert peak[0] == limit
    assert slots.zcard(keys_for(prefix, "race")[1]) == 0


def test_an_unreachable_redis_raises_an_error_naming_the_url() -> None:
    client = redis.Redis(port=1, socket_connect_timeout=0.2)
    gate = Gate(client, Scripts(client), "g", 1, 10, url="redis://127.0.0.1:1/0")
    with pytest.raises(RedisUnavailable, match=r"redis://127\.0\.0\.1:1/0"):
        gate.acquire("a", b"m")


def test_slots_are_numbered_and_a_freed_number_is_reused(gate: Gate) -> None:
    gate.acquire("a", b"", now_ms=T0)
    gate.acquire("b", b"", now_ms=T0)
    assert gate.slots() == {"1": "a", "2": "b"}
    gate.release("a", now_ms=T0)
    gate.acquire("c", b"", now_ms=T0)
    assert gate.slots() == {"1": "c", "2": "b"}


def test_a_late_copy_of_a_call_delivered_twice_is_refused_after_its_end(gate: Gate) -> None:
    gate.acquire("a", b"", now_ms=T0)
    gate.start("a", "w1", now_ms=T0)
    assert gate.start("a", "w2", now_ms=T0 + 1)[0] is Started.DUPLICATE
    assert gate.release("a", now_ms=T0 + 2).released is True
    # A third copy (a visibility-timeout redelivery) arrives after the call ended.
    assert gate.start("a", "w3", now_ms=T0 + 3)[0] is Started.ENDED
    # The memory of it is kept for the dedupe window only: the set expires with it...
    assert 0 < gate.client.pttl(gate.keys[6]) <= 3_600_000
    # ...and entries older than the window leave it when a new one arrives.
    later = T0 + 3 + 3_600_001
    gate.acquire("b", b"", now_ms=later)
    gate.start("b", "w1", now_ms=later)
    gate.start("b", "w2", now_ms=later)
    gate.release("b", now_ms=later)
    assert [m.decode() for m in gate.client.zrange(gate.keys[6], 0, -1)] == ["b"]


def test_a_call_seen_once_leaves_no_trace_after_its_end(gate: Gate) -> None:
    gate.acquire("a", b"", now_ms=T0)
    gate.start("a", "w1", now_ms=T0)
    gate.release("a", now_ms=T0)
    assert gate.client.zcard(gate.keys[6]) == 0
    assert gate.start("a", "w1", now_ms=T0 + 1)[0] is Started.REGRANTED


def test_a_flushed_redis_is_detected_and_the_gate_admits_no_one_until_the_lease_passes(
    gate: Gate,
) -> None:
    gate.acquire("a", b"", now_ms=T0)
    gate.start("a", "w1", now_ms=T0)
    gate.acquire("b", b"", now_ms=T0)
    old_epoch = gate.epoch
    gate.client.delete(*gate.keys)  # Redis restarted empty, or someone flushed it
    # Two calls run on; a new caller must not take their slots.
    assert gate.acquire("c", b"mc", now_ms=T0 + 100)[0] is Acquired.PARKED
    assert gate.epoch != old_epoch
    # A running call re-registers through its keepalive and is counted again.
    assert gate.keepalive(["a"], now_ms=T0 + 200) == ([], {})
    assert gate.slots() == {"1": "a"}
    assert gate.reclaim(now_ms=T0 + 300).grants == []
    # Once the longest lease has passed, the gate works normally again.
    grants = gate.reclaim(now_ms=T0 + 100 + 10_001).grants
    assert [g.task_id for g in grants] == ["c"]


def test_a_fresh_gate_is_not_mistaken_for_lost_data(gate: Gate) -> None:
    assert gate.acquire("a", b"", now_ms=T0)[0] is Acquired.GRANTED
    assert gate.epoch == str(T0)


def test_a_slot_is_claimed_once_and_a_call_holds_one_slot_at_most(gate: Gate) -> None:
    assert gate.claim("3", "job-1", "Db", lease_s=5, now_ms=T0)[0] is Claimed.CLAIMED
    assert gate.claim("3", "job-2", "Db", now_ms=T0)[0] is Claimed.SLOT_BUSY
    assert gate.claim("4", "job-1", "Db", now_ms=T0)[0] is Claimed.ALREADY_HELD
    assert gate.start("job-1", "w1", now_ms=T0)[2] == "Db"
    out = gate.release("job-1", now_ms=T0)
    assert (out.released, out.backend, out.slot) == (True, "Db", "3")


def test_a_parked_call_claimed_by_a_polling_slot_leaves_the_queue_with_its_message(
    gate: Gate,
) -> None:
    gate.acquire("a", b"", now_ms=T0)
    gate.acquire("b", b"", now_ms=T0)
    gate.acquire("c", b"mc", now_ms=T0)
    outcome, _, message = gate.claim("3", "c", "GatedCalls", now_ms=T0)
    assert (outcome, message) == (Claimed.CLAIMED, b"mc")
    assert gate.parked() == 0
    assert gate.slots() == {"1": "a", "2": "b", "3": "c"}


def test_a_refused_copy_is_kept_as_a_backup_and_dropped_when_the_call_ends(gate: Gate) -> None:
    gate.acquire("a", b"", now_ms=T0)
    gate.start("a", "w1", now_ms=T0)
    assert gate.acquire("a", b"copy", backup=True, now_ms=T0 + 1)[0] is Acquired.BACKED_UP
    assert gate.held() == 1 and gate.parked() == 0
    gate.release("a", now_ms=T0 + 2)
    assert gate.client.hlen(gate.keys[4]) == 0
    # A copy that arrives after the end is dropped, not parked.
    assert gate.acquire("a", b"late", backup=True, now_ms=T0 + 3)[0] is Acquired.DROPPED


def test_a_backup_runs_when_the_execution_it_waited_for_dies(gate: Gate) -> None:
    gate.acquire("a", b"", now_ms=T0)
    gate.start("a", "killed-child", now_ms=T0)
    gate.acquire("a", b"copy", backup=True, now_ms=T0 + 1)
    reclaimed, grants, _, _ = gate.reclaim(now_ms=T0 + 10_001)
    assert [(r.task_id, r.state) for r in reclaimed] == [("a", "parked")]
    assert [(g.task_id, g.message) for g in grants] == [("a", b"copy")]
    assert gate.start("a", "new-child", now_ms=T0 + 10_002)[0] is Started.RUN


def test_a_dead_runner_without_redelivery_is_reported_dropped_after_the_grace_only(
    slots: redis.Redis, prefix: str
) -> None:
    gate = Gate(slots, Scripts(slots), "g", 2, lease_s=10, prefix=prefix, dropped_after_s=60)
    gate.acquire("early-ack", b"", now_ms=T0)
    gate.start("early-ack", "host:1", now_ms=T0)
    gate.acquire("late-ack", b"", now_ms=T0)
    gate.start("late-ack", "host:2", redeliver=True, now_ms=T0)
    out = gate.reclaim(now_ms=T0 + 10_001)
    assert sorted((r.task_id, r.redeliver) for r in out.reclaimed) == [
        ("early-ack", False),
        ("late-ack", True),
    ]
    assert out.dropped == []
    assert gate.reclaim(now_ms=T0 + 10_001 + 59_000).dropped == []
    assert gate.reclaim(now_ms=T0 + 10_001 + 60_000).dropped == [("early-ack", "host:1")]
    assert gate.reclaim(now_ms=T0 + 10_001 + 61_000).dropped == []
    assert slots.exists(gate.keys[8]) == 0
