-- acquire: a call is sent; grant it the units it needs now, or keep it until it may start.
-- ARGV[1..4] see common.lua
-- ARGV[5] call id    the Celery task id
-- ARGV[6] call       JSON: gates, keys, weights, key_limits, priority, lease_ms, redeliver,
--                    and optionally max_pending, on_full, wait_ms
-- ARGV[7] limits     csv, the configured limit per gate (-1: per-key limits only); seeds a
--                    gate Redis does not know yet, never changes one it knows
-- ARGV[8] delay_ms   int, the call's countdown/ETA from now (0 for none)
-- ARGV[9] message    the serialized message; '' when the caller expects room (it then saves
--                    encoding and sending it)
-- ARGV[10] flags      'b' a backup (a refused second live execution, kept beside the running
--                    one), 'r' a re-send by the call's own run (retry, replace), or ''
-- Returns {epoch, code, n, limits csv, {id, fence, message}...calls handed room meanwhile};
-- code, n:
--   1, fence   granted now;            0, parked count   parked (waits for room);
--   7, 0       waiting for its time;   2, fence          a re-send by its own run keeps its hold;
--   3, 0       the id is already parked, waiting or held: nothing written (DuplicateCall);
--   4, fence   kept as a backup;       5, 0              a backup of a call that ended;
--   6, 0       it must be kept but no message came: nothing written, send it again;
--  10, fence   the id was granted at its first send and has not started: nothing written,
--              but this send publishes a copy (DuplicateCall), as the first one's may be lost;
--  11, 0       it waits for its requirements (the call's `needs`): the caller links them;
--  12, fence   granted now, and its message pushed into the broker's queue (see push.py).
-- Rows after the grants are tagged follow-ups (see common.lua, FOLLOW).
local id = ARGV[5]
local call = cjson.decode(ARGV[6])
local limits = split(ARGV[7], ',')
local delay_ms = tonumber(ARGV[8])
local message = ARGV[9]
local flags = ARGV[10]
local out = {}

local names = promote()
for i, name in ipairs(call.gates) do seed(name, limits[i]) end
-- The call's record keeps prefetch (its start and end look at it); the gate's state holds
-- the count, which send_ahead reads.
local prefetch = tonumber(call.prefetch) or 0
if prefetch ~= gate(call.gates[1]).prefetch then
  gate(call.gates[1]).prefetch = prefetch
  redis.call('HSET', K_STATE, call.gates[1] .. ':prefetch', prefetch)
end
local extra = {}
local function reply(code, n)
  pump(names, out)
  local r = {EPOCH, code, n, limits_of(call.gates), extra}
  for _, g in ipairs(out) do r[#r + 1] = g end
  for _, g in ipairs(FOLLOW) do r[#r + 1] = g end
  return r
end

local rec = load(id)
if rec == false then
  forget(id, rec)
  rec = nil
end
if flags == 'b' then
  -- The running execution may be alive (a visibility-timeout copy) or dead (a killed child
  -- whose message came back): keep this copy until the first one releases (then it is
  -- dropped) or its lease expires (then reclaim parks it, and the call runs again).
  if rec and rec.state == 'running' then
    rec.seen_twice, rec.stored = true, true
    save(id, rec)
    redis.call('HSET', K_MESSAGES, id, message)
    return reply(4, rec.fence)
  end
  if rec or redis.call('ZSCORE', K_ENDED, id) then return reply(5, 0) end
end
if rec then
  if flags == 'r' and (rec.state == 'running' or rec.state == 'granted') and delay_ms > 0 then
    -- A retry with a countdown gives its hold back for the wait, then competes again at its
    -- old place among the calls of its priority (it keeps its task id and record).
    if message == '' then return reply(6, 0) end
    local freed = {gates = {}, keys = {}}
    ungrant(id, rec, freed)
    redis.call('ZREM', K_HOLDERS, id)
    note(id, rec, 'RETRYING', 'retry')
    rec.state, rec.retry, rec.slot = 'waiting', true, nil
    rec.ready_ms = NOW + delay_ms
    rec.dispatches, rec.seen_twice = 0, nil
    rec.lease_ms, rec.stored = call.lease_ms, true
    save(id, rec)
    redis.call('ZADD', K_DELAYED, rec.ready_ms, id)
    note_due(rec.ready_ms)
    redis.call('HSET', K_MESSAGES, id, message)
    names = concat(names, wake(freed))
    return reply(7, 0)
  end
  if flags == 'r' and (rec.state == 'running' or rec.state == 'granted') then
    -- An immediate retry or a replacement keeps its hold; its next start is a legitimate
    -- one, not a duplicate.
    note(id, rec, 'RETRYING', 'retry')
    rec.state = 'granted'
    rec.ready_ms = 0
    if delay_ms > 0 then rec.ready_ms = NOW + delay_ms end
    rec.lease_ms = call.lease_ms
    save(id, rec)
    redis.call('ZADD', K_HOLDERS, 'GT', math.max(NOW, rec.ready_ms) + rec.lease_ms, id)
    return reply(2, rec.fence)
  end
  if flags == '' and rec.state == 'granted' and not rec.backend and (rec.dispatches or 0) == 0
      and redis.call('HEXISTS', K_MESSAGES, id) == 0 then
    -- Granted at its first send, which published its message itself: Redis cannot tell
    -- whether it reached the broker (that caller may have lost the answer in a stall). This
    -- send publishes a copy; the id is remembered at its end, so only one copy runs.
    rec.seen_twice = true
    save(id, rec)
    return reply(10, rec.fence)
  end
  return reply(3, 0)
end

rec = call
rec.dispatches = 0
if rec.needs and #rec.needs > 0 then
  -- Waits for its requirements, taking nothing; their ends admit it (see satisfy).
  if message == '' then return reply(6, 0) end
  note(id, rec, 'WAITING', 'submit')
  rec.state = 'needs'
  rec.ready_ms = 0
  if delay_ms > 0 then rec.ready_ms = NOW + delay_ms end
  rec.stored, rec.met, rec.inputs = true, {}, {}
  save(id, rec)
  redis.call('HINCRBY', K_STATE, 'needs', 1)
  redis.call('HSET', K_MESSAGES, id, message)
  return reply(11, 0)
end
rec.needs = nil
if delay_ms > 0 then
  if message == '' then return reply(6, 0) end
  note(id, rec, 'WAITING', 'submit')
  rec.state = 'waiting'
  rec.ready_ms = NOW + delay_ms
  rec.stored = true
  save(id, rec)
  redis.call('ZADD', K_DELAYED, rec.ready_ms, id)
  note_due(rec.ready_ms)
  redis.call('HSET', K_MESSAGES, id, message)
  return reply(7, 0)
end
local fence, verdict, g, key = try_grant(id, rec)
if fence then
  -- Where the broker is this server, its message goes to the broker's queue in this step.
  if pushed(message, false, '') then return reply(12, fence) end
  return reply(1, fence)
end
if message == '' then return reply(6, 0) end
local cap = tonumber(rec.max_pending) or 0
if cap > 0 then
  local pending = pending_of(rec)
  if pending >= cap then
    local policy = rec.on_full or 'park'
    if policy == 'reject' then
      count(rec.gates, 'rejected')
      return reply(8, pending)
    end
    if policy == 'drop' then
      count(rec.gates, 'dropped')
      return reply(9, pending)
    end
    -- Debounce: the newest call of its gates and keys takes the place of their oldest
    -- waiting call, whatever that one's priority (a lane is one priority only).
    local victim, victim_seq = nil, nil
    local alike_rec = {gates = rec.gates, keys = rec.keys}
    for p = 0, (policy == 'replace') and 255 or -1 do
      alike_rec.priority = p
      local alike = lane_of(alike_rec)
      local head, m = lane_head(alike)
      local seq = head and string.sub(m, #alike + 2, #alike + 17)
      if head and (not victim_seq or seq < victim_seq) then victim, victim_seq = head, seq end
    end
    if policy == 'replace' and victim then
      local old = load(victim)
      extra = {'replaced', victim, redis.call('HGET', K_MESSAGES, victim) or ''}
      finish(victim, old, 'REPLACED', 'replaced', {reason = id})
      names[#names + 1] = rec.gates[1]
    else
      extra = {'over', pending}
    end
  end
end
redis.call('HSET', K_MESSAGES, id, message)
rec.stored = true
park_at(id, rec, verdict, g, key)
send_ahead(gate(rec.gates[1]))
return reply(0, redis.call('ZCARD', K_QUEUE))
