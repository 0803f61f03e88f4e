-- start: a worker begins running a call; mark it running and renew its lease (a keepalive).
-- ARGV[1..3] see common.lua
-- ARGV[4] call id
-- ARGV[5] limit      int
-- ARGV[6] lease_ms   int, used when the call has to take a slot again
-- ARGV[7] runner     who runs it (host and pid), to tell a second live execution apart
-- ARGV[8] redeliver  '1' when the broker redelivers the call if its worker dies (acks_late)
-- Returns {epoch, code, fence, backend}; code:
--   1 run it;  6 the call had lost its slot and took a free one: run it;
--   4 the call runs elsewhere right now: a duplicate delivery, do not run;
--   5 the call's grant expired and it is parked again: skip, it will be sent again;
--   7 the call holds no slot and none is free: send it through the gate again;
--   8 the call already ran to its end (a late duplicate delivery): do not run.
local id = ARGV[4]
local limit = gate_limit(ARGV[5])

local rec = load(id)
if rec == false then
  forget(id, rec)
  rec = nil
end
if rec then
  local backend = rec.b or ''
  if rec.s == 'r' then
    rec.d = 1
    save(id, rec)
    return {EPOCH, 4, rec.f, backend}
  end
  if rec.s == 'p' then
    -- A late copy of a call whose grant expired: it may run now only if a slot is free.
    local slot = admit(limit)
    if not slot then return {EPOCH, 5, 0, backend} end
    redis.call('ZREM', K_QUEUE, id)
    redis.call('HDEL', K_CALLS, id)
    rec.e = 0
    rec.w = ARGV[7]
    rec.a = ARGV[8] == '1'
    return {EPOCH, 1, grant(id, rec, 'r', slot), backend}
  end
  rec.s = 'r'
  rec.e = 0
  rec.w = ARGV[7]
  rec.a = ARGV[8] == '1'
  save(id, rec)
  redis.call('ZADD', K_HOLDERS, NOW + rec.l, id)
  redis.call('HDEL', K_CALLS, id)
  return {EPOCH, 1, rec.f, backend}
end

if redis.call('ZSCORE', K_ENDED, id) then return {EPOCH, 8, 0, ''} end
if redis.call('ZCARD', K_QUEUE) == 0 then
  local slot = admit(limit)
  if slot then
    local rec = {l = tonumber(ARGV[6]), e = 0, x = 1, w = ARGV[7], a = ARGV[8] == '1'}
    return {EPOCH, 6, grant(id, rec, 'r', slot), ''}
  end
end
return {EPOCH, 7, 0, ''}
