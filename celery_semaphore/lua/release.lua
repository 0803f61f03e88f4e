-- release: a call ended; give its units back, settle the calls that required it, and hand
-- room to waiting calls, in one step.
-- ARGV[1..4] see common.lua
-- ARGV[5] call id
-- ARGV[6] fence      int, or '' to release whatever grant the call holds
-- ARGV[7] window_ms  int, how long a call that must not start again is remembered
-- ARGV[8] state      how it ended: SUCCEEDED (or ''), FAILED, CANCELLED, DROPPED
-- ARGV[9] payload    its encoded result or error, for dependents ('' when none asked)
-- ARGV[10] text      its error as text ('' when it succeeded)
-- Returns {epoch, released (0/1), backend, slot, {id, fence, message, inputs}...handed-off
-- calls, follow-up rows...}. Releasing twice, or after the hold was reclaimed or granted
-- again (other fence), frees nothing; the dependents of a call whose record is gone (its
-- lease was reclaimed while it still ran) are settled all the same.
local id = ARGV[5]
local fence = ARGV[6]
local final = ARGV[8]
if final == '' then final = 'SUCCEEDED' end
local info = {payload = ARGV[9], text = ARGV[10], reason = ''}
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
    tombstone(id, tonumber(ARGV[7]))
  end
  ungrant(id, rec, freed)
  count(rec.gates, 'released')
  finish(id, rec, final, 'end', info)
  released = 1
elseif not rec then
  finish(id, nil, final, 'end', info)
end
local names = concat(wake(freed), promote())
pump(names, out)
settle_due()
local r = {EPOCH, released, backend, slot}
for _, g in ipairs(out) do r[#r + 1] = g end
for _, g in ipairs(FOLLOW) do r[#r + 1] = g end
return r
