-- reclaim: take back slots whose lease expired, then hand free slots to parked calls.
-- KEYS    see common.lua
-- ARGV[1] now_ms     int or ''
-- ARGV[2] limit      int
-- ARGV[3] batch      int, most leases reclaimed in one call
-- Returns {{id, state, runner, fence}...reclaimed, {id, fence, message}...handed off}.
-- A handed-off call that never started (its publisher may have died) still has its message:
-- it is parked again at its old place instead of being dropped, so an accepted call is not lost.
local now = clock(ARGV[1])
local expired = redis.call('ZRANGEBYSCORE', K_HOLDERS, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local reclaimed = {}
for _, id in ipairs(expired) do
  local rec = load(id)
  if rec and rec.s == 'g' and rec.q and redis.call('HEXISTS', K_CALLS, id) == 1 then
    redis.call('ZREM', K_HOLDERS, id)
    rec.s = 'p'
    rec.x = (rec.x or 0) + 1
    save(id, rec)
    redis.call('ZADD', K_QUEUE, rec.q, id)
    reclaimed[#reclaimed + 1] = {id, 'parked', '', rec.f}
  else
    local state, runner, fence = 'malformed', '', 0
    if rec then state, runner, fence = rec.s, rec.w or '', rec.f end
    forget(id)
    reclaimed[#reclaimed + 1] = {id, state, runner, fence}
  end
end
return {reclaimed, handoff(gate_limit(ARGV[2]), now, {})}
