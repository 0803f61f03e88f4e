-- reclaim (the tick): take back expired leases, start calls whose time has come, and hand
-- room to waiting calls of every gate of the group.
-- ARGV[1..4] see common.lua
-- ARGV[5] batch          int, most leases reclaimed in one call
-- ARGV[6] grace_ms       int, how long after its lease expired a call with no redelivery
--                        coming is reported as dropped (unless its result arrived meanwhile)
-- ARGV[7] max_dispatches int, how many times a call may be handed room without starting
--                        before it is given up
-- ARGV[8] backoff_ms     int, how long such a call waits (times its dispatches) before it
--                        competes again, behind the calls that waited meanwhile
-- ARGV[9] window_ms      int, how long a given-up call is remembered (a late copy is refused)
-- Returns {epoch, {{id, state, runner, fence, backend, slot, redeliver, dispatches, message}...},
--          ('lock-expired': a Semaphore hold whose waiter never took it)
--          {{id, fence, message}...}, {"id runner"...}, {{id, waited ms, message}...}}:
-- reclaimed leases (state is the
-- call's state then, or 'waiting' when it will be sent again, or 'abandoned'), handed-off
-- calls, calls now reported dropped (message: an abandoned call's, else ''), and parked calls
-- whose wait_timeout passed (they left their lanes and never run); then when anything of
-- the group is next due ('' for nothing: the tick's index forgets the group).
local expired = redis.call('ZRANGEBYSCORE', K_HOLDERS, '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[5]))
local grace_ms, max_dispatches = tonumber(ARGV[6]), tonumber(ARGV[7])
local reclaimed, out = {}, {}
local freed = {gates = {}, keys = {}}

local function suspect(id, rec)
  redis.call('ZADD', K_SUSPECT, NOW, id .. ' ' .. (rec.runner or ''))
  redis.call('PEXPIRE', K_SUSPECT, 2 * grace_ms + 60000)
end

-- The earliest time anything of this group is due, for the tick's index (nil: nothing).
local function next_due()
  local at = nil
  local function consider(ms)
    if ms and (not at or ms < at) then at = ms end
  end
  for _, k in ipairs({K_HOLDERS, K_DELAYED, K_EXPIRES, K_OUTBOX}) do
    local first = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
    if first[2] then consider(tonumber(first[2])) end
  end
  local first = redis.call('ZRANGE', K_SUSPECT, 0, 0, 'WITHSCORES')
  if first[2] then consider(tonumber(first[2]) + grace_ms) end
  if RECOVER_UNTIL then consider(tonumber(RECOVER_UNTIL)) end
  return at
end

for _, id in ipairs(expired) do
  local rec = load(id)
  if not rec or (rec.state ~= 'granted' and rec.state ~= 'running') then
    if rec == false then set_aside(id, {}) end
    forget(id, rec)
    reclaimed[#reclaimed + 1] = {id, 'malformed', '', 0, '', '', 0, 0, ''}
  else
    local redeliver = 0
    if rec.redeliver then redeliver = 1 end
    local row = {id, rec.state, rec.runner or '', rec.fence, rec.backend or '', rec.slot or '',
      redeliver, rec.dispatches or 0, ''}
    ungrant(id, rec, freed)
    count(rec.gates, 'reclaimed')
    redis.call('ZREM', K_HOLDERS, id)
    local message = redis.call('HGET', K_MESSAGES, id)
    if rec.state == 'granted' and message and string.sub(message, 1, 15) == 'semaphore-lock:' then
      -- A Semaphore hold granted to a process that never took it (it died waiting): nothing
      -- sends it again; a waiter that is merely slow finds its record gone and queues anew.
      row[2] = 'lock-expired'
      forget(id, rec)
    elseif (rec.state == 'granted' or rec.unconfirmed) and message then
      -- Handed room but never started: its publisher died, no worker consumes its queue, or
      -- its start could not be recorded (and so it did not run). Send it again later, a
      -- bounded number of times, letting the calls behind it go first meanwhile.
      rec.dispatches = (rec.dispatches or 0) + 1
      row[8] = rec.dispatches
      if rec.dispatches >= max_dispatches then
        row[2] = 'abandoned'
        row[9] = redis.call('HGET', K_MESSAGES, id)
        tombstone(id, tonumber(ARGV[9]))
        finish(id, rec, 'DROPPED', 'abandoned', {reason = 'never started',
          text = 'NeverStarted: handed room ' .. rec.dispatches .. ' times'})
      else
        row[2] = 'waiting'
        note(id, rec, 'WAITING', 'lease-expired')
        rec.state = 'waiting'
        rec.slot = nil
        -- A call held ahead of its grant whose holder never started it: sent anew next time.
        rec.ahead, rec.holder, rec.unconfirmed, rec.runner = nil, nil, nil, nil
        redis.call('DEL', wake_key(id))
        rec.ready_ms = NOW + tonumber(ARGV[8]) * rec.dispatches
        save(id, rec)
        redis.call('ZADD', K_DELAYED, rec.ready_ms, id)
        note_due(rec.ready_ms)
      end
    elseif rec.state == 'running' and redis.call('HEXISTS', K_MESSAGES, id) == 1 then
      -- It died (or stalled) while a copy of it waited as its backup: the copy runs instead,
      -- competing from now on, so the call is neither lost nor reported dropped.
      note(id, rec, 'WAITING', 'lease-expired')
      rec.state = 'waiting'
      rec.slot = nil
      rec.ready_ms = NOW
      save(id, rec)
      redis.call('ZADD', K_DELAYED, NOW, id)
      note_due(NOW)
    else
      if not rec.redeliver and not rec.backend then
        -- Its worker died, or only stalled (a solo pool, a long pause), or a granted call's
        -- message was lost with the worker that held it: wait before saying so.
        suspect(id, rec)
        -- Its history says so now; its dependents wait for the grace (it may still end).
        note(id, rec, 'DROPPED', 'lease-expired')
        keep_history(id, rec, 'DROPPED', {reason = 'lease expired', text = 'CallDropped'})
      end
      forget(id, rec)
    end
    reclaimed[#reclaimed + 1] = row
  end
end
local dropped = redis.call('ZRANGEBYSCORE', K_SUSPECT, '-inf', NOW - grace_ms)
if #dropped > 0 then redis.call('ZREMRANGEBYSCORE', K_SUSPECT, '-inf', NOW - grace_ms) end
for _, entry in ipairs(dropped) do
  -- Reported dropped now: the calls that required it are cancelled.
  local at = string.find(entry, ' ', 1, true)
  finish(string.sub(entry, 1, (at or 0) - 1), nil, 'DROPPED', 'dropped',
    {text = 'CallDropped'})
end
-- Requirement ends another group was told of but did not acknowledge: tell it again.
for _, m in ipairs(redis.call('ZRANGEBYSCORE', K_OUTBOX, '-inf', NOW, 'LIMIT', 0, 100)) do
  local ok, n = pcall(cjson.decode, m)
  if ok and type(n) == 'table' then
    redis.call('ZADD', K_OUTBOX, NOW + OUTBOX_RETRY_MS, m)
    FOLLOW[#FOLLOW + 1] = {TAG_NOTE, n.tag, n.dep, n.req, n.state, n.payload, n.text, n.task, m}
  else
    redis.call('ZREM', K_OUTBOX, m)
  end
end
wake(freed)
local expired = expire({})
promote(true)
-- Repair the parked counter should it ever drift (an entry removed by hand, say).
local queued = redis.call('ZCARD', K_QUEUE)
if queued ~= PARKED then
  PARKED = queued
  redis.call('HSET', K_STATE, 'parked', queued)
end
pump(all_gates(), out)
concat(out, FOLLOW)
DUE_AT = next_due()
if DUE_AT then redis.call('HSET', K_STATE, 'due_at', DUE_AT) else redis.call('HDEL', K_STATE, 'due_at') end
if INDEX_HERE then
  if DUE_AT then index_add(DUE_AT, false) else redis.call('ZREM', K_INDEX, GROUP) end
end
return {EPOCH, reclaimed, out, dropped, expired, tostring(DUE_AT or '')}
