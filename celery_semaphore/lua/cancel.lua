-- cancel: remove a parked call before it was handed a slot.
-- KEYS    see common.lua
-- ARGV[1] call id
-- Returns 1 when a parked call was removed, 0 when the call was not parked.
local rec = load(ARGV[1])
if not rec or rec.s ~= 'p' then return 0 end
forget(ARGV[1])
return 1
