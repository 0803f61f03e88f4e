-- release: a call ended; free its slot and hand free slots to parked calls, in one step.
-- ARGV[1..3] see common.lua
-- ARGV[4] call id
-- ARGV[5] fence      int, or '' to release whatever grant the call holds
-- ARGV[6] limit      int
-- ARGV[7] window_ms  int, how long a call that was delivered more than once is remembered
-- Returns {epoch, released (0/1), backend, slot, {id, fence, message}...handed-off calls}.
-- Releasing twice, or after the slot was reclaimed or re-granted (other fence), frees nothing.
local id = ARGV[4]
local fence = ARGV[5]

local released, backend, slot = 0, '', ''
local rec = load(id)
if rec == false then
  forget(id, rec)
  released = 1
elseif rec and rec.s ~= 'p' and (fence == '' or tonumber(fence) == rec.f) then
  backend, slot = rec.b or '', rec.n or ''
  if (rec.x or 0) > 0 or rec.d then
    -- Seen twice already: a late copy of this call must not run again after its end.
    -- Pruned here, where it grows, not on every release; the TTL ends an idle set.
    redis.call('ZREMRANGEBYSCORE', K_ENDED, '-inf', NOW - tonumber(ARGV[7]))
    redis.call('ZADD', K_ENDED, NOW, id)
    redis.call('PEXPIRE', K_ENDED, tonumber(ARGV[7]))
  end
  forget(id, rec)
  released = 1
end
return handoff(gate_limit(ARGV[6]), {EPOCH, released, backend, slot})
