-- reclaim: take back slots whose lease expired, then hand free slots to parked calls.
-- ARGV[1..3] see common.lua
-- ARGV[4] limit      int
-- ARGV[5] batch      int, most leases reclaimed in one call
-- ARGV[6] grace_ms   int, how long after its lease expired a running call with no redelivery
--                    coming is reported as dropped (unless its result arrived meanwhile)
-- Returns {epoch, {{id, state, runner, fence, backend, slot, redeliver}...},
--         {{id, fence, message}...}, {"id runner"...}}: reclaimed leases (redeliver is 1 when
-- the broker will bring the call back), handed-off calls, and calls now reported dropped.
-- A call whose message is still stored is parked again instead of dropped, so an accepted call
-- is not lost: a handed-off call that never started (its publisher may have died) goes back to
-- its old place; a running call that died while a backup copy waited goes to the head.
local expired = redis.call('ZRANGEBYSCORE', K_HOLDERS, '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[5]))
local reclaimed = {}
for _, id in ipairs(expired) do
  local rec = load(id)
  if rec and rec.s ~= 'p' and redis.call('HEXISTS', K_CALLS, id) == 1 then
    if rec.n and redis.call('HGET', K_SLOTS, rec.n) == id then unslot(rec.n) end
    redis.call('ZREM', K_HOLDERS, id)
    reclaimed[#reclaimed + 1] = {id, 'parked', rec.w or '', rec.f, rec.b or '', rec.n or '', 1}
    rec.s = 'p'
    rec.n = nil
    rec.x = (rec.x or 0) + 1
    rec.q = rec.q or 0
    rec.e = 0
    save(id, rec)
    redis.call('ZADD', K_QUEUE, rec.q, id)
  else
    local row = {id, 'malformed', '', 0, '', '', 0}
    if rec then
      local redeliver = 0
      if rec.a then redeliver = 1 end
      row = {id, rec.s, rec.w or '', rec.f, rec.b or '', rec.n or '', redeliver}
      if rec.s == 'r' and not rec.a and not rec.b then
        -- Its worker died, or only stalled (a solo pool, a long pause): wait before saying so.
        redis.call('ZADD', K_SUSPECT, NOW, id .. ' ' .. (rec.w or ''))
        redis.call('PEXPIRE', K_SUSPECT, 2 * tonumber(ARGV[6]) + 60000)
      end
    end
    forget(id, rec)
    reclaimed[#reclaimed + 1] = row
  end
end
local due = redis.call('ZRANGEBYSCORE', K_SUSPECT, '-inf', NOW - tonumber(ARGV[6]))
if #due > 0 then redis.call('ZREMRANGEBYSCORE', K_SUSPECT, '-inf', NOW - tonumber(ARGV[6])) end
return {EPOCH, reclaimed, handoff(gate_limit(ARGV[4]), {}), due}
