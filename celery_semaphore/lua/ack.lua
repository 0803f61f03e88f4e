-- ack: another group counted a notice of this group's outbox (a requirement's end): forget it.
-- ARGV[1..4] see common.lua
-- ARGV[5] notice    the outbox member
-- Returns {epoch, removed (0/1)}.
local removed = redis.call('ZREM', K_OUTBOX, ARGV[5])
settle_due()
return {EPOCH, removed}
