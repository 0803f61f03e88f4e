-- acquire: take a slot for a call if one is free and nobody waits, else park the call.
-- ARGV[1..3] see common.lua
-- ARGV[4] call id    the Celery task id
-- ARGV[5] limit      int, slots 1..limit serve gated calls
-- ARGV[6] lease_ms   int, lease of the slot once granted
-- ARGV[7] delay_ms   int, the call's countdown/ETA from now (0 for none); its lease starts then
-- ARGV[8] message    the serialized message, stored only when the call is parked; '' when the
--                    caller expects a free slot (it then saves encoding and sending it)
-- ARGV[9] backup     '1' when a worker refused this call as a second live execution and sends
--                    it as a backup: kept beside the running call, parked only if that one dies
-- Returns {epoch, 1, fence} granted now, {epoch, 0, parked count} parked,
--         {epoch, 2, fence} the call already holds a slot (a retry or re-send): it keeps it,
--         {epoch, 3, 0} the call is already parked,
--         {epoch, 4, fence} backup kept, {epoch, 5, 0} backup dropped (the call already ended),
--         {epoch, 6, 0} the call must park but no message came: nothing written, send it again.
local id = ARGV[4]
local limit = gate_limit(ARGV[5])
local lease_ms = tonumber(ARGV[6])
local eta_ms = 0
if tonumber(ARGV[7]) > 0 then eta_ms = NOW + tonumber(ARGV[7]) end

local rec = load(id)
if ARGV[9] == '1' then
  -- The running execution may be dead (a killed child whose message came back) or alive (a
  -- visibility-timeout copy): keep this copy until the first one releases (then it is
  -- dropped) or its lease expires (then reclaim parks it, and the call runs again).
  if rec and rec.s == 'r' then
    rec.d = 1
    save(id, rec)
    redis.call('HSET', K_CALLS, id, ARGV[8])
    return {EPOCH, 4, rec.f}
  end
  if rec or redis.call('ZSCORE', K_ENDED, id) then return {EPOCH, 5, 0} end
end
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
if ARGV[8] == '' then return {EPOCH, 6, 0} end
record.q = redis.call('HINCRBY', K_STATE, 'seq', 1)
record.s = 'p'
save(id, record)
redis.call('ZADD', K_QUEUE, record.q, id)
redis.call('HSET', K_CALLS, id, ARGV[8])
return {EPOCH, 0, redis.call('ZCARD', K_QUEUE)}
