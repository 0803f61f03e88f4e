-- release: a call ended; give its units back and hand room to waiting calls, in one step.
-- ARGV[1..3] see common.lua
-- ARGV[4] call id
-- ARGV[5] fence      int, or '' to release whatever grant the call holds
-- ARGV[6] window_ms  int, how long a call that must not start again is remembered
-- Returns {epoch, released (0/1), backend, slot, {id, fence, message}...handed-off calls}.
-- Releasing twice, or after the hold was reclaimed or granted again (other fence), frees
-- nothing.
local id = ARGV[4]
local fence = ARGV[5]
local out = {}
local freed = {gates = {}, keys = {}}

local released, backend, slot = 0, '', ''
local rec = load(id)
if rec == false then
  set_aside(id, {})
  forget(id, rec)
  released = 1
elseif rec and (rec.state == 'granted' or rec.state == 'running')
    and (fence == '' or tonumber(fence) == rec.fence) then
  backend, slot = rec.backend or '', rec.slot or ''
  if rec.seen_twice or (rec.dispatches or 0) > 0 or rec.backend then
    -- A late copy of this call (or a backend's id polled again) must not run again.
    tombstone(id, tonumber(ARGV[6]))
  end
  ungrant(id, rec, freed)
  forget(id, rec)
  released = 1
end
local names = concat(wake(freed), promote())
pump(names, out)
local r = {EPOCH, released, backend, slot}
for _, g in ipairs(out) do r[#r + 1] = g end
return r
