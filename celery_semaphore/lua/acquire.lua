-- acquire: take a slot for a call if one is free and nobody waits, else park the call.
-- ARGV[1..3] see common.lua
-- ARGV[4] call id    the Celery task id
-- ARGV[5] limit      int, slots 1..limit serve gated calls
-- ARGV[6] lease_ms   int, lease of the slot once granted
-- ARGV[7] delay_ms   int, the call's countdown/ETA from now (0 for none); its lease starts then
-- ARGV[8] message    the serialized message, stored only when the call is parked
-- Returns {epoch, 1, fence} granted now, {epoch, 0, parked count} parked,
--         {epoch, 2, fence} the call already holds a slot (a retry or re-send): it keeps it,
--         {epoch, 3, 0} the call is already parked.
local id = ARGV[4]
local limit = gate_limit(ARGV[5])
local lease_ms = tonumber(ARGV[6])
local eta_ms = 0
if tonumber(ARGV[7]) > 0 then eta_ms = NOW + tonumber(ARGV[7]) end

local rec = load(id)
if rec then
  if rec.s == 'p' then return {EPOCH, 3, 0} end
  -- A holder sending itself again is a retry: it keeps its slot through the countdown, and
  -- its next start is a legitimate one, not a duplicate.
  rec.s = 'g'
  rec.e = eta_ms
  rec.l = lease_ms
  save(id, rec)
  local start = NOW
  if eta_ms > NOW then start = eta_ms end
  redis.call('ZADD', K_HOLDERS, 'GT', start + lease_ms, id)
  return {EPOCH, 2, rec.f}
end

local record = {l = lease_ms, e = eta_ms, x = 0}
if redis.call('ZCARD', K_QUEUE) == 0 then
  local slot = admit(limit)
  if slot then return {EPOCH, 1, grant(id, record, 'g', slot)} end
end
record.q = redis.call('HINCRBY', K_STATE, 'seq', 1)
record.s = 'p'
save(id, record)
redis.call('ZADD', K_QUEUE, record.q, id)
redis.call('HSET', K_CALLS, id, ARGV[8])
return {EPOCH, 0, redis.call('ZCARD', K_QUEUE)}
