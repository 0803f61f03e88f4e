"""The tick's index: which groups have something due, and when.

A sorted set ``{prefix:ticks}:due`` (group tag -> the earliest time the tick must look at
it), so the tick visits only the groups whose time came and idle gates and keys cost it
nothing. On one Redis server the scripts write it themselves, in the same atomic step (it is
one of their KEYS): a grant, a start time or a wait_timeout adds the group (``ZADD LT``), an
end that leaves nothing due removes it. On a Redis Cluster it lives on another slot than the
groups, so the scripts tell the client (a ``Due`` follow-up) and the client adds it; the tick
then removes idle groups, and a slow sweep of every group (a bounded slice per tick) repairs a
write lost with a dying client.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

from .views import text

#: How long the index outlives its latest entry (seconds).
GRACE_S = 3600

__all__ = ["NOTE", "SETTLE", "due_groups", "index_key", "note_due", "settle"]

# Add a group's due time unless it has an earlier one, and keep the index for ARGV[3] ms at
# least, as common.lua's index_add does (EXPIRE NX / GT would need Redis 7).
NOTE = """
redis.call('ZADD', KEYS[1], 'LT', ARGV[2], ARGV[1])
local keep = tonumber(ARGV[3])
if redis.call('PTTL', KEYS[1]) < keep then redis.call('PEXPIRE', KEYS[1], keep) end
return 1
"""

# After the tick visited a group whose index entry it read as `seen`: store the group's next
# due time, unless a script told an earlier one meanwhile (then that one stays).
SETTLE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and score ~= ARGV[2] then
  if ARGV[3] ~= '' then redis.call('ZADD', KEYS[1], 'LT', ARGV[3], ARGV[1]) end
  return 0
end
if ARGV[3] == '' then redis.call('ZREM', KEYS[1], ARGV[1]) else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) end
return 1
"""


_scripts: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def _script(client: Any, source: str) -> Any:
    """``source`` registered once per client (EVALSHA from then on)."""
    mine = _scripts.setdefault(client, {})
    if source not in mine:
        mine[source] = client.register_script(source)
    return mine[source]


def index_key(prefix: str) -> str:
    """The index of one key prefix."""
    return f"{{{prefix}:ticks}}:due"


def note_due(client: Any, prefix: str, tag: str, ms: int) -> None:
    """The group tagged ``tag`` has something due at ``ms``: the tick must look at it by then.

    The index outlives its latest entry by an hour (``GRACE_S``), as the scripts keep it.
    """
    keep_ms = max(0, ms - int(time.time() * 1000)) + GRACE_S * 1000
    script = _script(client, NOTE)
    script(keys=[index_key(prefix)], args=[tag, ms, keep_ms])


def due_groups(client: Any, prefix: str, now_ms: int, batch: int) -> list[tuple[str, str]]:
    """(group name, the score read) of the groups whose time came, at most ``batch``."""
    rows = client.zrangebyscore(index_key(prefix), "-inf", now_ms, 0, batch, withscores=True)
    head = len(prefix) + 2  # "{prefix:"
    return [(text(m)[head:-1], _score(s)) for m, s in rows]


def settle(client: Any, prefix: str, tag: str, seen: str, next_due: int | None) -> None:
    """Record a group's next due time after a visit, on a cluster (see :data:`SETTLE`)."""
    script = _script(client, SETTLE)
    script(keys=[index_key(prefix)], args=[tag, seen, "" if next_due is None else next_due])


def _score(value: float) -> str:
    # As Lua reads ZSCORE: an integral score without a fraction.
    return str(int(value)) if float(value).is_integer() else repr(value)
