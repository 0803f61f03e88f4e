-- cancel: remove a parked call before it was handed a slot.
-- ARGV[1..3] see common.lua
-- ARGV[4] call id
-- Returns {epoch, 1} when a parked call was removed, {epoch, 0} when it was not parked.
local rec = load(ARGV[4])
if not rec or rec.s ~= 'p' then return {EPOCH, 0} end
forget(ARGV[4], rec)
return {EPOCH, 1}
