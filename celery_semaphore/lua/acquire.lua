-- acquire: take a slot for a call if one is free and nobody waits, else park the call.
-- KEYS    see common.lua (state, holders, meta, queue, calls)
-- ARGV[1] now_ms     int or '' (Redis TIME)
-- ARGV[2] call id    the Celery task id
-- ARGV[3] limit      int, the configured number of slots
-- ARGV[4] lease_ms   int, lease of the slot once granted
-- ARGV[5] delay_ms   int, the call's countdown/ETA from now (0 for none); its lease starts then
-- ARGV[6] message    the serialized message, stored only when the call is parked
-- Returns {1, fence} granted now, {0, parked_count} parked,
--         {2, fence} the call already holds a slot (a retry or re-send): it keeps it,
--         {3, 0} the call is already parked.
local now = clock(ARGV[1])
local id = ARGV[2]
local limit = gate_limit(ARGV[3])
local lease_ms = tonumber(ARGV[4])
local eta_ms = 0
if tonumber(ARGV[5]) > 0 then eta_ms = now + tonumber(ARGV[5]) end

local rec = load(id)
if rec then
  if rec.s == 'p' then return {3, 0} end
  -- A holder sending itself again is a retry: it keeps its slot through the countdown,
  -- and its next start is a legitimate one, not a duplicate.
  rec.s = 'g'
  rec.e = eta_ms
  rec.l = lease_ms
  save(id, rec)
  local start = now
  if eta_ms > now then start = eta_ms end
  redis.call('ZADD', K_HOLDERS, 'GT', start + lease_ms, id)
  return {2, rec.f}
end

local record = {l = lease_ms, e = eta_ms, x = 0}
if redis.call('ZCARD', K_HOLDERS) < limit and redis.call('ZCARD', K_QUEUE) == 0 then
  return {1, grant(id, record, now, 'g')}
end
record.q = redis.call('HINCRBY', K_STATE, 'seq', 1)
record.s = 'p'
save(id, record)
redis.call('ZADD', K_QUEUE, record.q, id)
redis.call('HSET', K_CALLS, id, ARGV[6])
return {0, redis.call('ZCARD', K_QUEUE)}
