-- satisfy: a requirement (of another group, or already ended when its dependent was sent)
-- ended; the dependent of this group counts it, and competes for its gates once it was the
-- last, or ends without running when it failed (or was cancelled).
-- ARGV[1..4] see common.lua
-- ARGV[5] dependent    the waiting call's id
-- ARGV[6] requirement  the ended call's id
-- ARGV[7] state        how it ended: SUCCEEDED, FAILED, CANCELLED, EXPIRED, DROPPED, REPLACED
-- ARGV[8] payload      its encoded result or error ('' when not kept)
-- ARGV[9] text         its error as text
-- ARGV[10] task        its task name
-- Returns {epoch, counted (0: the dependent no longer waits for it), follow-up rows...}.
local counted = satisfy(ARGV[5], ARGV[6], ARGV[10], ARGV[7], {payload = ARGV[8], text = ARGV[9]})
local r = {EPOCH, counted and 1 or 0}
for _, g in ipairs(FOLLOW) do r[#r + 1] = g end
return r
