-- claim: a scheduler's idle slot takes a call a backend handed it.
-- ARGV[1..4] see common.lua
-- ARGV[5] gate       the gate the slots belong to
-- ARGV[6] slot       the slot number
-- ARGV[7] call id    the id the backend's poll() returned
-- ARGV[8] lease_ms   int, the slot's timeout
-- ARGV[9] backend    the backend's name, recorded for its callbacks
-- ARGV[10] limit      int, the gate's configured size (seeds it)
-- Returns {epoch, code, fence}; code: 1 claimed; 9 the slot is busy or the gate is full;
-- 10 the call already holds this group's units; 11 recovering; 12 the call ended recently
-- (a backend's poll returned an id that already ran).
local name, slot, id = ARGV[5], ARGV[6], ARGV[7]
seed(name, ARGV[10])
if redis.call('HEXISTS', K_SLOTS, name .. ':' .. slot) == 1 then return {EPOCH, 9, 0} end
if recovering() then return {EPOCH, 11, 0} end
if redis.call('ZSCORE', K_ENDED, id) then return {EPOCH, 12, 0} end
local rec = load(id)
if rec then return {EPOCH, 10, rec.fence or 0} end
rec = {gates = {name}, keys = {''}, weights = {1}, key_limits = {0}, priority = 0,
  lease_ms = tonumber(ARGV[8]), dispatches = 0, backend = ARGV[9], slot = slot}
if fits(rec, nil, nil) ~= 'ok' then return {EPOCH, 9, 0} end
redis.call('HSET', K_SLOTS, name .. ':' .. slot, id)
return {EPOCH, 1, grant(id, rec, 'granted')}
