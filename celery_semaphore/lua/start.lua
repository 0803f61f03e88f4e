-- start: a worker begins running a call; mark it running and renew its lease.
-- KEYS    see common.lua
-- ARGV[1] now_ms     int or ''
-- ARGV[2] call id
-- ARGV[3] limit      int
-- ARGV[4] lease_ms   int, used when the call has to take a slot again
-- ARGV[5] runner     who runs it (host and pid), to tell a second live execution apart
-- Returns {1, fence} run it,
--         {4, fence} the call already runs elsewhere: a duplicate delivery, do not run,
--         {5, 0}     the call is parked again (its grant expired): skip, it will be sent again,
--         {6, fence} the call held no slot (reclaimed or lost) and took a free one: run it,
--         {7, 0}     the call holds no slot and none is free: send it through the gate again.
local now = clock(ARGV[1])
local id = ARGV[2]
local limit = gate_limit(ARGV[3])
local lease_ms = tonumber(ARGV[4])

local rec = load(id)
if rec == false then
  forget(id)
  rec = nil
end
if rec then
  if rec.s == 'r' then return {4, rec.f} end
  if rec.s == 'p' then
    -- A late copy of a call whose grant expired: it may run now only if a slot is free.
    if redis.call('ZCARD', K_HOLDERS) >= limit then return {5, 0} end
    redis.call('ZREM', K_QUEUE, id)
    rec.e = 0
  end
  rec.w = ARGV[5]
  if rec.s == 'p' then
    grant(id, rec, now, 'r')
  else
    rec.s = 'r'
    rec.e = 0
    save(id, rec)
    redis.call('ZADD', K_HOLDERS, now + rec.l, id)
  end
  redis.call('HDEL', K_CALLS, id)
  return {1, rec.f}
end

if redis.call('ZCARD', K_HOLDERS) < limit and redis.call('ZCARD', K_QUEUE) == 0 then
  return {6, grant(id, {l = lease_ms, e = 0, x = 0, w = ARGV[5]}, now, 'r')}
end
return {7, 0}
