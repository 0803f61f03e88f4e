-- claim: a scheduler's idle slot takes a call a backend handed it.
-- ARGV[1..3] see common.lua
-- ARGV[4] slot       the slot number
-- ARGV[5] call id    the id the backend's poll() returned
-- ARGV[6] lease_ms   int, the slot's timeout
-- ARGV[7] backend    the backend's name, recorded for its callbacks
-- Returns {epoch, code, fence, message}; code:
--   1 claimed (message is the parked message when the call was a parked gated call, else '');
--   9 the slot is busy; 10 the call already holds a slot of this gate; 11 recovering.
local slot, id = ARGV[4], ARGV[5]
if redis.call('HEXISTS', K_SLOTS, slot) == 1 then return {EPOCH, 9, 0, ''} end
if recovering() then return {EPOCH, 11, 0, ''} end
local rec = load(id)
if rec and rec.s ~= 'p' then return {EPOCH, 10, rec.f, ''} end
local message = ''
if rec and rec.s == 'p' then
  redis.call('ZREM', K_QUEUE, id)
  message = redis.call('HGET', K_CALLS, id) or ''
else
  rec = {e = 0, x = 0}
end
rec.l = tonumber(ARGV[6])
rec.b = ARGV[7]
redis.call('ZREM', K_FREE, slot)
return {EPOCH, 1, grant(id, rec, 'g', slot), message}
