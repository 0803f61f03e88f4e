-- common: helpers prepended to every script by scripts.py (Lua has no include in Redis).
--
-- Key schema of one gate group G (one hash tag {prefix:G}: every gate of the group lives on
-- one Redis Cluster slot, so stacked gates are one atomic step):
--   KEYS[1]  {prefix:G}:state     hash  epoch, fence, seq, turn, gate_count, gates (csv),
--                                       recover_until, lost:<epoch>, parked (calls in the
--                                       queue), next_due (earliest start time waiting),
--                                       needs (calls waiting for requirements);
--                                       per gate <gate>:limit
--                                       (-1 = per-key limits only), <gate>:used (units held),
--                                       <gate>:index (its band, 0..255), <gate>:paused,
--                                       <gate>:peak (most units held at once),
--                                       <gate>\31<key>:limit (a key limit resized live)
--   KEYS[2]  {prefix:G}:calls     hash  call id -> JSON record (see below)
--   KEYS[3]  {prefix:G}:messages  hash  call id -> serialized message (opaque to Lua), kept
--                                       while a call waits and until a handed-off call starts
--   KEYS[4]  {prefix:G}:holders   zset  call id -> lease deadline (ms, Redis TIME)
--   KEYS[5]  {prefix:G}:queue     zset  every parked call, score 0, member
--                                       "<lane>\31<seq, 16 digits>\31<id>": a lane's calls
--                                       in order by ZRANGEBYLEX
--   KEYS[6]  {prefix:G}:lanes     hash  lane -> JSON {priority, turn, wait, gate, member}
--   KEYS[7]  {prefix:G}:bands     zset  lane -> index(gate) * 2^45 + (255 - priority) * 2^37
--                                       + turn: lanes waiting for capacity of a gate, best first
--   KEYS[8]  {prefix:G}:blocked   zset  score 0, "<gate>\31<key>\31<lane>": lanes waiting
--                                       for room under a per-key limit
--   KEYS[9]  {prefix:G}:delayed   zset  call id -> when it may compete (countdown, ETA, retry
--                                       of a call that never started)
--   KEYS[10] {prefix:G}:usage     hash  "<gate>\31<key>" -> units the key holds (no field at 0)
--   KEYS[11] {prefix:G}:ended     zset  call id -> end time (ms): calls that must not start
--                                       again (seen twice, cancelled, started by a backend);
--                                       expires after the dedupe window
--   KEYS[12] {prefix:G}:suspect   zset  "id runner" -> when a lease expired with no
--                                       redelivery coming; due ones are reported dropped
--   KEYS[13] {prefix:G}:aside     hash  call id -> an entry that could not be read
--   KEYS[14] {prefix:G}:slots     hash  "<gate>:<n>" -> call id in scheduler slot n
--   KEYS[15] {prefix:G}:pending   hash  "<gate>" and "<gate>\31<key>" -> parked calls whose
--                                       first gate (and key) it is (no field at 0), for
--                                       max_pending
--   KEYS[16] {prefix:G}:expires   zset  parked call id -> when its wait_timeout ends
--   KEYS[17] {prefix:G}:history   hash  ended call id -> JSON {task, state, events, end_ms,
--                                       reason, error, gates, keys, fence, needs}
--   KEYS[18] {prefix:G}:done      zset  ended call id -> end time (ms): history pruning
--   KEYS[19] {prefix:G}:dependents hash call id -> "<tag>\31<dependent id>" entries joined
--                                       by \30 (tag: the dependent's "{prefix:group}"):
--                                       calls that wait for this one's end
--   KEYS[21] {prefix:G}:journal   list  the operations done on the group's gates, newest first
--                                       (JSON {ms, who, what}), the last 100
--   KEYS[22] {prefix:G}:since     zset  parked call id -> when it parked (the oldest parked)
--   KEYS[23] {prefix:ticks}:due   zset  the tick's index, group tag -> when something of it
--                                       falls due (see due.py); on a Redis Cluster a key of
--                                       this group instead, unused (the client writes it)
-- Metrics live in the state hash (a group at rest keeps that hash only): "m\31<gate>\31
-- <counter>" -> count; "m\31<gate>\31<wait|hold>\31<bucket>" -> calls in that bucket, and
-- "...\31sum" -> ms.
--   KEYS[20] {prefix:G}:outbox    zset  notice JSON {tag, dep, req, state, payload, text,
--                                       task} -> when to tell the dependent's group again
--                                       that its requirement ended (until acknowledged)
--
-- A lane is "<gates csv>\31<priority, 3 digits>\31<key per gate, \31-joined>": the calls
-- that need the same gates and keys at the same priority, first in first out. A lane waits
-- in exactly one place: the band of a gate without room for its head, or the blocked set
-- of a full key. Invariant after every script: no gate has room for the best head of its
-- band (the head of the line holds the gate's free units, so heavy calls are not starved),
-- and no key of a blocked lane has room.
--
-- A call record: state (needs: waits for requirements; waiting: for its start time; parked,
-- granted, running), task, events (its history: {ms, state, event}), gates, keys, weights,
-- key_limits, priority, lease_ms, fence, lane, seq, order (its place when first sent, kept
-- by a retry), ready_ms, parked_ms, runner, redeliver, dispatches (times handed capacity
-- without starting), seen_twice, retry, stored (a message is kept in the messages hash),
-- backend, slot; optional max_pending, on_full, wait_ms, track; with requirements: needs
-- (ids, in order), met (id -> true), inputs (index -> encoded result), on_fail, feeds.
--
-- Every script takes ARGV[1] now_ms ('' for Redis TIME), ARGV[2] the epoch the client saw
-- last ('' if none), ARGV[3] recovery ms (the longest lease), ARGV[4] how long an ended
-- call's history is kept (ms, 0: not at all); its own arguments follow.
-- Every reply starts with the current epoch.
if redis.replicate_commands then redis.replicate_commands() end

local K_STATE, K_CALLS, K_MESSAGES, K_HOLDERS = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_QUEUE, K_LANES, K_BANDS, K_BLOCKED = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_DELAYED, K_USAGE, K_ENDED, K_SUSPECT = KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local K_ASIDE, K_SLOTS, K_PENDING, K_EXPIRES = KEYS[13], KEYS[14], KEYS[15], KEYS[16]
local K_HISTORY, K_DONE, K_DEPENDENTS, K_OUTBOX = KEYS[17], KEYS[18], KEYS[19], KEYS[20]
local K_JOURNAL, K_SINCE = KEYS[21], KEYS[22]
local HISTORY_MS = tonumber(ARGV[4]) or 0
-- This group's hash tag "{prefix:group}": dependents under it are served in the same step.
local GROUP = string.sub(KEYS[1], 1, #KEYS[1] - 6)

local SEP = string.char(31)
local BAND = 35184372088832 -- 2^45: one band per gate
local PRIORITY = 137438953472 -- 2^37: turns per priority
local PROMOTE_BATCH = 100
local MAX_GRANTS = 1000 -- per script; the tick carries on where one stopped

local function clock(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local NOW = clock(ARGV[1])

-- parked and next_due let the hot path skip the queue and the delayed set when they are empty.
local STATE = redis.call('HMGET', K_STATE, 'epoch', 'recover_until', 'parked', 'next_due',
  'due_at')
local EPOCH, RECOVER_UNTIL = STATE[1], STATE[2]
local PARKED, NEXT_DUE = tonumber(STATE[3]) or 0, tonumber(STATE[4])
local DUE_AT = tonumber(STATE[5])

-- Rows a script adds to its reply beside the grants, each tagged (see group.py): traces of
-- tracked calls, calls ended here without running, requirements ended for another group, and
-- when the tick must next look at this group.
local FOLLOW = {}
local TAG_TRACE, TAG_END, TAG_NOTE = string.char(30) .. 't', string.char(30) .. 'end',
  string.char(30) .. 'note'
local TAG_DUE = string.char(30) .. 'due'

-- The tick visits only groups with something due (a lease, a start time, a wait_timeout, a
-- notice, a suspect, the end of recovery): due_at in the state hash is the earliest time this
-- group told the tick's index; something due earlier tells it again (the client adds it).
-- On one server the index is KEYS[23] and written here; on a Redis Cluster it lives on
-- another slot (KEYS[23] is then a key of this group, unused) and the client writes it.
local K_INDEX = KEYS[23]
local INDEX_HERE = string.sub(K_INDEX, 1, #GROUP) ~= GROUP
-- The index outlives its latest entry by an hour, so a prefix nobody ticks any more leaves
-- nothing behind for ever.
local INDEX_GRACE_MS = 3600000
local function index_add(ms, lt)
  if lt then redis.call('ZADD', K_INDEX, 'LT', ms, GROUP) else redis.call('ZADD', K_INDEX, ms, GROUP) end
  local keep = ms - NOW + INDEX_GRACE_MS
  if redis.call('PTTL', K_INDEX) < keep then redis.call('PEXPIRE', K_INDEX, keep) end
end
local function due(ms)
  if not DUE_AT or ms < DUE_AT then
    DUE_AT = ms
    redis.call('HSET', K_STATE, 'due_at', ms)
    if INDEX_HERE then
      index_add(ms, true)
    else
      FOLLOW[#FOLLOW + 1] = {TAG_DUE, tostring(ms)}
    end
  end
end

-- After an end: a group with nothing left that can fall due leaves the index at once.
local function settle_due()
  if not DUE_AT or RECOVER_UNTIL then return end
  for _, k in ipairs({KEYS[4], KEYS[9], KEYS[16], KEYS[20], KEYS[12]}) do
    if redis.call('ZCARD', k) > 0 then return end
  end
  DUE_AT = nil
  redis.call('HDEL', K_STATE, 'due_at')
  if INDEX_HERE then redis.call('ZREM', K_INDEX, GROUP) end
end

-- A client that saw another epoch means the data set was lost (restart without persistence,
-- flush): units held by calls still running are unknown, so the group admits nothing new
-- until they re-register through their keepalive or the longest lease has passed.
if not EPOCH then
  EPOCH = tostring(NOW)
  redis.call('HSET', K_STATE, 'epoch', EPOCH)
end
if ARGV[2] ~= '' and ARGV[2] ~= EPOCH and redis.call('HSETNX', K_STATE, 'lost:' .. ARGV[2], NOW) == 1 then
  RECOVER_UNTIL = tostring(NOW + tonumber(ARGV[3]))
  redis.call('HSET', K_STATE, 'recover_until', RECOVER_UNTIL)
  due(tonumber(RECOVER_UNTIL))
end

local function recovering()
  if not RECOVER_UNTIL then return false end
  if tonumber(RECOVER_UNTIL) > NOW then return true end
  redis.call('HDEL', K_STATE, 'recover_until')
  RECOVER_UNTIL = nil
  return false
end

local function split(s, sep)
  local out = {}
  if s == nil or s == '' then return out end
  local from = 1
  while true do
    local at = string.find(s, sep, from, true)
    if not at then
      out[#out + 1] = string.sub(s, from)
      return out
    end
    out[#out + 1] = string.sub(s, from, at - 1)
    from = at + #sep
  end
end

-- Broker push (see push.py): a stored message "kombu\31<list key>\31<payload>" is a kombu
-- message of the broker's Redis (this server), put in its queue by the script that grants it,
-- so nobody publishes it. At a hand-off its first header becomes semaphore_handoff "1",
-- followed by a workflow node's inputs. Returns false for any other message.
local PUSH = 'kombu' .. SEP
local HANDOFF_MARK = '"headers": {"semaphore_handoff": "0"'
local function pushed(message, handoff, inputs)
  if string.sub(message, 1, 6) ~= PUSH then return false end
  local at = string.find(message, SEP, 7, true)
  if not at then return false end
  local key, payload = string.sub(message, 7, at - 1), string.sub(message, at + 1)
  if handoff then
    local m = string.find(payload, HANDOFF_MARK, 1, true)
    if not m then return false end
    local head = '"headers": {"semaphore_handoff": "1"'
    if inputs ~= '' then head = head .. ', "semaphore_inputs": ' .. cjson.encode(inputs) end
    payload = string.sub(payload, 1, m - 1) .. head .. string.sub(payload, m + #HANDOFF_MARK)
  end
  redis.call('LPUSH', key, payload)
  return true
end

-- The reply row of a call handed room: {id, fence, message, inputs}, or, when it was pushed
-- here, {id, fence, '', '', 1}.
local function handed(id, fence, message, inputs)
  if pushed(message, true, inputs) then return {id, fence, '', '', 1} end
  return {id, fence, message, inputs}
end

-- Prefetch (semaphore_prefetch): the first calls of a full gate's best lane go to the
-- broker ahead of their grant, so that a worker holds each (its start answers 9, see
-- start.lua) and runs it the moment a release grants it: no broker hop at the hand-off. A
-- grant of such a call pushes a token to its wake list, which the holding worker waits on.
local WAKE_TTL_MS = 600000
local function wake_key(id)
  return GROUP .. ':wake:' .. id
end

local function wake_ahead(id, token)
  local key = wake_key(id)
  redis.call('LPUSH', key, token)
  redis.call('PEXPIRE', key, WAKE_TTL_MS)
end

local function concat(a, b)
  for _, v in ipairs(b) do a[#a + 1] = v end
  return a
end


-- Metrics, counted by the scripts that already run: counters per gate, and histograms of
-- the time calls waited for room and held it, in fixed buckets (ms; the last is +Inf).
local METRIC = 'm' .. SEP
local BUCKETS_MS = {5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
  300000, 1800000}

local function count(names, what)
  for _, name in ipairs(names) do redis.call('HINCRBY', K_STATE, METRIC .. name .. SEP .. what, 1) end
end

local function observe(names, what, ms)
  if ms < 0 then ms = 0 end
  local bucket = #BUCKETS_MS + 1
  for i, le in ipairs(BUCKETS_MS) do
    if ms <= le then
      bucket = i
      break
    end
  end
  for _, name in ipairs(names) do
    local field = METRIC .. name .. SEP .. what .. SEP
    redis.call('HINCRBY', K_STATE, field .. bucket, 1)
    redis.call('HINCRBY', K_STATE, field .. 'sum', ms)
  end
end

-- An operation on a gate, for its journal: who (host:pid), when, what.
local function journal(who, what)
  redis.call('LPUSH', K_JOURNAL, cjson.encode({ms = NOW, who = who, what = what}))
  redis.call('LTRIM', K_JOURNAL, 0, 99)
end

-- The call state machine (public names). A transition not listed is refused and logged.
-- The allowed "FROM>TO" pairs, each between bars, in one constant string: a table of tables
-- here was built again on every run of every script.
local MOVES = [[
|NEW>WAITING|NEW>PARKED|NEW>DISPATCHED|
|WAITING>PARKED|WAITING>DISPATCHED|WAITING>RUNNING|WAITING>CANCELLED|WAITING>FAILED|
|WAITING>EXPIRED|WAITING>DROPPED|WAITING>REPLACED|
|PARKED>DISPATCHED|PARKED>RUNNING|PARKED>CANCELLED|PARKED>EXPIRED|PARKED>REPLACED|
|PARKED>DROPPED|
|DISPATCHED>RUNNING|DISPATCHED>WAITING|DISPATCHED>RETRYING|DISPATCHED>CANCELLED|
|DISPATCHED>DROPPED|DISPATCHED>SUCCEEDED|DISPATCHED>FAILED|
|RUNNING>SUCCEEDED|RUNNING>FAILED|RUNNING>RETRYING|RUNNING>CANCELLED|RUNNING>DROPPED|
|RUNNING>WAITING|
|RETRYING>WAITING|RETRYING>PARKED|RETRYING>DISPATCHED|RETRYING>RUNNING|RETRYING>CANCELLED|
|RETRYING>DROPPED|RETRYING>SUCCEEDED|RETRYING>FAILED|]]
local MAX_EVENTS = 24

-- Record a transition in the call's history (Redis time); returns false when refused.
local function note(id, rec, to, event)
  local from = rec.status or 'NEW'
  if from == to then return true end
  if not string.find(MOVES, '|' .. from .. '>' .. to .. '|', 1, true) then
    redis.log(redis.LOG_WARNING, 'celery_semaphore: refused transition of call ' .. id .. ': ' ..
      from .. '->' .. event .. '->' .. to)
    return false
  end
  rec.status = to
  local events = rec.events or {}
  if #events >= MAX_EVENTS then table.remove(events, 2) end
  events[#events + 1] = {NOW, to, event}
  rec.events = events
  if rec.track then FOLLOW[#FOLLOW + 1] = {TAG_TRACE, id, rec.task or '', from, event, to} end
  return true
end

-- Gate state, read once per script.
local GATES = {}
local function gate(name)
  local g = GATES[name]
  if g then return g end
  local v = redis.call('HMGET', K_STATE, name .. ':limit', name .. ':used', name .. ':index',
    name .. ':paused', name .. ':peak', name .. ':prefetch')
  g = {name = name, limit = tonumber(v[1]), used = tonumber(v[2]) or 0, index = tonumber(v[3]),
    paused = v[4] == '1', peak = tonumber(v[5]) or 0, prefetch = tonumber(v[6]) or 0}
  GATES[name] = g
  return g
end

-- Make a gate known: its limit is seeded by the first client that names it (the configured
-- one); afterwards only resize changes it. Returns the limit in force.
local function seed(name, limit)
  local g = gate(name)
  if not g.index then
    g.index = redis.call('HINCRBY', K_STATE, 'gate_count', 1) - 1
    redis.call('HSET', K_STATE, name .. ':index', g.index)
    local known = redis.call('HGET', K_STATE, 'gates')
    if known then known = known .. ',' .. name else known = name end
    redis.call('HSET', K_STATE, 'gates', known)
  end
  if not g.limit then
    g.limit = tonumber(limit)
    redis.call('HSET', K_STATE, name .. ':limit', g.limit)
  end
  return g.limit
end

local function room(g)
  if g.limit == nil or g.paused then return 0 end
  if g.limit < 0 then return math.huge end
  return g.limit - g.used
end

local function load(id)
  local raw = redis.call('HGET', K_CALLS, id)
  if not raw then return nil end
  local ok, rec = pcall(cjson.decode, raw)
  if not ok or type(rec) ~= 'table' or type(rec.gates) ~= 'table' then return false end
  return rec
end

local function save(id, rec)
  redis.call('HSET', K_CALLS, id, cjson.encode(rec))
end

-- The inputs a call receives, in `needs` order: 'v<result>', 'e<error>', 'x<json cause>' (an
-- error with no encoded form), or 'b<id>' (read the result from the result backend).
local function inputs_of(rec)
  if not rec.needs or not rec.feeds then return '' end
  local list, inputs = {}, rec.inputs or {}
  for i = 1, #rec.needs do list[i] = inputs[tostring(i)] or ('b' .. rec.needs[i]) end
  return cjson.encode(list)
end

local function lane_of(rec)
  local keys = {}
  for i = 1, #rec.gates do keys[i] = rec.keys[i] or '' end
  return table.concat(rec.gates, ',') .. SEP .. string.format('%03d', rec.priority) .. SEP ..
    table.concat(keys, SEP)
end

local function score_of(priority, turn)
  return (255 - priority) * PRIORITY + turn
end

local function member_of(rec, id)
  return rec.lane .. SEP .. string.format('%016d', rec.seq) .. SEP .. id
end

local function lane_head(lane)
  local m = redis.call('ZRANGEBYLEX', K_QUEUE, '[' .. lane .. SEP, '[' .. lane .. SEP .. '\255',
    'LIMIT', 0, 1)[1]
  if not m then return nil end
  return string.sub(m, #lane + 19), m
end

local function load_lane(lane)
  local raw = redis.call('HGET', K_LANES, lane)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function save_lane(lane, L)
  redis.call('HSET', K_LANES, lane, cjson.encode(L))
end

-- Take a lane out of the place it waits in.
local function unwait(lane, L)
  if L.wait == 'band' then
    redis.call('ZREM', K_BANDS, lane)
  elseif L.wait == 'key' then
    redis.call('ZREM', K_BLOCKED, L.member)
  end
  L.wait, L.gate, L.member = nil, nil, nil
end

local function wait_in_band(lane, L, g)
  unwait(lane, L)
  L.wait, L.gate = 'band', g.name
  redis.call('ZADD', K_BANDS, g.index * BAND + score_of(L.priority, L.turn), lane)
  save_lane(lane, L)
end

local function wait_for_key(lane, L, gname, key)
  unwait(lane, L)
  L.wait, L.member = 'key', gname .. SEP .. key .. SEP .. lane
  redis.call('ZADD', K_BLOCKED, 0, L.member)
  save_lane(lane, L)
end

-- Whether a call fits now. `score` is its lane's place (nil: behind every waiting lane);
-- a better lane waiting in a gate's band keeps that gate's units (head of the line).
-- Returns 'ok', or 'gate', gate, or 'key', gate, key, or 'recover'.
local function fits(rec, lane, score)
  if recovering() then return 'recover' end
  for i, name in ipairs(rec.gates) do
    local g = gate(name)
    if room(g) < rec.weights[i] then return 'gate', g end
    if PARKED > 0 then
      local lo = g.index * BAND
      local best = redis.call('ZRANGEBYSCORE', K_BANDS, lo, '(' .. (lo + BAND), 'WITHSCORES',
        'LIMIT', 0, 1)
      if best[1] and best[1] ~= lane and (score == nil or tonumber(best[2]) - lo < score) then
        return 'gate', g
      end
    end
  end
  for i, name in ipairs(rec.gates) do
    local key, cap = rec.keys[i] or '', tonumber(rec.key_limits[i]) or 0
    if key ~= '' then
      -- A limit resized live (operate.lua) overrides the configured one.
      cap = tonumber(redis.call('HGET', K_STATE, name .. SEP .. key .. ':limit')) or cap
    end
    if key ~= '' and cap > 0 then
      local used = tonumber(redis.call('HGET', K_USAGE, name .. SEP .. key)) or 0
      if used + rec.weights[i] > cap then return 'key', gate(name), key end
    end
  end
  return 'ok'
end

-- Take the call's units of every gate and key; fences grow per group, so per gate too.
local function grant(id, rec, state)
  for i, name in ipairs(rec.gates) do
    local g = gate(name)
    g.used = g.used + rec.weights[i]
    redis.call('HSET', K_STATE, name .. ':used', g.used)
    if g.used > g.peak then
      g.peak = g.used
      redis.call('HSET', K_STATE, name .. ':peak', g.used)
    end
    local key = rec.keys[i] or ''
    if key ~= '' then redis.call('HINCRBY', K_USAGE, name .. SEP .. key, rec.weights[i]) end
  end
  observe(rec.gates, 'wait', NOW - (tonumber(rec.parked_ms) or NOW))
  rec.parked_ms, rec.granted_ms = nil, NOW
  rec.fence = redis.call('HINCRBY', K_STATE, 'fence', 1)
  if state == 'running' then note(id, rec, 'RUNNING', 'start') else note(id, rec, 'DISPATCHED', 'grant') end
  rec.state = state
  local start = NOW
  if rec.ready_ms and rec.ready_ms > NOW then start = rec.ready_ms end
  redis.call('ZADD', K_HOLDERS, start + rec.lease_ms, id)
  due(start + rec.lease_ms)
  save(id, rec)
  return rec.fence
end

-- Give the call's units back; returns the gates and keys that gained room.
local function ungrant(id, rec, freed)
  if rec.granted_ms then observe(rec.gates, 'hold', NOW - rec.granted_ms) end
  for i, name in ipairs(rec.gates) do
    local g = gate(name)
    g.used = math.max(0, g.used - rec.weights[i])
    redis.call('HSET', K_STATE, name .. ':used', g.used)
    local key = rec.keys[i] or ''
    if key ~= '' then
      local field = name .. SEP .. key
      if redis.call('HINCRBY', K_USAGE, field, -rec.weights[i]) <= 0 then
        redis.call('HDEL', K_USAGE, field)
      end
      freed.keys[#freed.keys + 1] = {name, key}
    end
    freed.gates[#freed.gates + 1] = name
  end
  if rec.slot then
    local field = rec.gates[1] .. ':' .. rec.slot
    if redis.call('HGET', K_SLOTS, field) == id then redis.call('HDEL', K_SLOTS, field) end
  end
end

-- The pending counter a call's max_pending is measured on: its first gate, or that gate's key.
local function pending_field(rec)
  local key = rec.keys[1] or ''
  if key ~= '' then return rec.gates[1] .. SEP .. key end
  return rec.gates[1]
end

local function pending_of(rec)
  return tonumber(redis.call('HGET', K_PENDING, pending_field(rec))) or 0
end

-- Take a parked call's entry out of the queue and of the counters that follow it.
local function unqueue(id, rec, member)
  if redis.call('ZREM', K_QUEUE, member) == 1 then
    PARKED = math.max(0, redis.call('HINCRBY', K_STATE, 'parked', -1))
  end
  if rec then
    local field = pending_field(rec)
    if redis.call('HINCRBY', K_PENDING, field, -1) <= 0 then redis.call('HDEL', K_PENDING, field) end
  end
  redis.call('ZREM', K_EXPIRES, id)
  redis.call('ZREM', K_SINCE, id)
end

-- Remove a parked call from its lane; the lane goes when it is empty.
local function unpark(id, rec)
  unqueue(id, rec, member_of(rec, id))
  if not lane_head(rec.lane) then
    local L = load_lane(rec.lane)
    if L then unwait(rec.lane, L) end
    redis.call('HDEL', K_LANES, rec.lane)
  end
end

-- Append a call to its lane; a new lane waits where `verdict` says (default: its first gate).
local function park(id, rec, verdict, g, key, event)
  note(id, rec, 'PARKED', event or 'park')
  rec.lane = lane_of(rec)
  rec.seq = rec.seq or rec.order or redis.call('HINCRBY', K_STATE, 'seq', 1)
  rec.order = rec.order or rec.seq
  rec.state = 'parked'
  rec.parked_ms = NOW
  save(id, rec)
  redis.call('ZADD', K_QUEUE, 0, member_of(rec, id))
  PARKED = redis.call('HINCRBY', K_STATE, 'parked', 1)
  redis.call('ZADD', K_SINCE, NOW, id)
  count(rec.gates, 'parked')
  redis.call('HINCRBY', K_PENDING, pending_field(rec), 1)
  if (tonumber(rec.wait_ms) or 0) > 0 then
    redis.call('ZADD', K_EXPIRES, NOW + tonumber(rec.wait_ms), id)
    due(NOW + tonumber(rec.wait_ms))
  end
  local L = load_lane(rec.lane)
  if L then return nil end
  L = {priority = rec.priority, turn = redis.call('HINCRBY', K_STATE, 'turn', 1)}
  if verdict == 'key' then
    wait_for_key(rec.lane, L, g.name, key)
    return nil
  end
  g = g or gate(rec.gates[1])
  wait_in_band(rec.lane, L, g)
  return g.name
end

local function forget(id, rec)
  if rec and rec.state == 'parked' and rec.lane then unpark(id, rec) end
  -- A wake token of a call of a prefetching gate (a let-go a stopping worker sent to all
  -- its calls, one its holder never read) goes with the call.
  if rec and rec.prefetch then redis.call('DEL', wake_key(id)) end
  if rec and rec.state == 'needs' then redis.call('HINCRBY', K_STATE, 'needs', -1) end
  redis.call('ZREM', K_HOLDERS, id)
  if not rec or rec.state == 'waiting' or rec.state == 'needs' then
    redis.call('ZREM', K_DELAYED, id)
  end
  redis.call('HDEL', K_CALLS, id)
  if not rec or rec.stored then redis.call('HDEL', K_MESSAGES, id) end
end

local function tombstone(id, window_ms)
  -- Pruned here, where it grows; the TTL ends an idle set.
  redis.call('ZREMRANGEBYSCORE', K_ENDED, '-inf', NOW - window_ms)
  redis.call('ZADD', K_ENDED, NOW, id)
  redis.call('PEXPIRE', K_ENDED, window_ms)
end

local function set_aside(id, out)
  local raw = (redis.call('HGET', K_CALLS, id) or '') .. ' ' .. (redis.call('HGET', K_MESSAGES, id) or '')
  redis.call('HSET', K_ASIDE, id, raw)
  out[#out + 1] = {id, -1, raw}
end

-- Serve the best lane of a gate's band once: grant its head, or move the lane where it
-- must wait. Returns false when the gate itself has no room for it (head of the line).
local function serve(g, lane, out)
  local L = load_lane(lane)
  local id, m = lane_head(lane)
  if not L or not id then
    redis.call('ZREM', K_BANDS, lane)
    redis.call('HDEL', K_LANES, lane)
    return true
  end
  local rec = load(id)
  local message = redis.call('HGET', K_MESSAGES, id)
  if not rec or not message or rec.state ~= 'parked' then
    unqueue(id, rec or nil, m)
    if rec then rec.state = 'aside' end
    set_aside(id, out)
    redis.call('HDEL', K_CALLS, id)
    redis.call('HDEL', K_MESSAGES, id)
    return true
  end
  local score = score_of(L.priority, L.turn)
  local verdict, h, key = fits(rec, lane, score)
  if verdict == 'recover' then return false end
  if verdict == 'gate' then
    if h.name == g.name then return false end
    wait_in_band(lane, L, h)
    return true
  end
  if verdict == 'key' then
    wait_for_key(lane, L, h.name, key)
    return true
  end
  unqueue(id, rec, m)
  rec.lane, rec.seq, rec.ready_ms = nil, nil, 0
  if rec.ahead and rec.holder then
    -- A worker holds it (see start.lua): it runs there from now on, woken by a token with
    -- its fence and whether its result is wanted, without a start of its own. Until the
    -- holder confirms, its message stays here: a holder that died never ran it (reclaim).
    rec.runner, rec.unconfirmed = rec.holder, true
    local fence = grant(id, rec, 'running')
    redis.call('DEL', wake_key(id))
    wake_ahead(id, fence .. ',' .. redis.call('HEXISTS', K_DEPENDENTS, id))
    out[#out + 1] = {id, fence, '', '', 1}
  elseif rec.ahead then
    -- Its message went to the broker ahead of this grant and no worker holds it yet: the
    -- worker that receives it finds it granted and runs it.
    out[#out + 1] = {id, grant(id, rec, 'granted'), '', '', 1}
  else
    out[#out + 1] = handed(id, grant(id, rec, 'granted'), message, inputs_of(rec))
  end
  count(rec.gates, 'dispatched')
  if lane_head(lane) then
    -- Round robin: a served lane goes behind the other lanes of its priority.
    L.turn = redis.call('HINCRBY', K_STATE, 'turn', 1)
    wait_in_band(lane, L, g)
  else
    unwait(lane, L)
    redis.call('HDEL', K_LANES, lane)
  end
  return true
end

local function send_ahead(g)
  local n = g.prefetch
  if n <= 0 or PARKED == 0 or not g.index then return end
  local lo = g.index * BAND
  local lane = redis.call('ZRANGEBYSCORE', K_BANDS, lo, '(' .. (lo + BAND), 'LIMIT', 0, 1)[1]
  if not lane then return end
  local members = redis.call('ZRANGEBYLEX', K_QUEUE, '[' .. lane .. SEP,
    '[' .. lane .. SEP .. '\255', 'LIMIT', 0, n)
  for _, m in ipairs(members) do
    local id = string.sub(m, #lane + 19)
    local rec = load(id)
    if rec and rec.state == 'parked' and not rec.ahead then
      local message = redis.call('HGET', K_MESSAGES, id)
      if not message or not pushed(message, true, inputs_of(rec)) then return end
      -- A token left from an earlier hold of this call (a grant its holder took by its own
      -- start, a holder that died, a let-go) must not wake the next holder.
      redis.call('DEL', wake_key(id))
      rec.ahead = true
      save(id, rec)
    end
  end
end

-- A call of a prefetching gate starts: the next call to hold ahead of its grant goes out
-- now, not at the release that granted this one, so that its delivery does not compete with
-- the hand-off. Other calls (rec.prefetch unset) pay nothing here, not even the gate's read.
local function ahead_next(rec)
  if rec.prefetch and PARKED > 0 then send_ahead(gate(rec.gates[1])) end
end

-- Hand room of the given gates to the lanes waiting for it, best first.
local function pump(names, out)
  if PARKED == 0 or recovering() then return out end
  local seen = {}
  for _, name in ipairs(names) do
    local g = gate(name)
    if not seen[name] and g.index then
      seen[name] = true
      local lo = g.index * BAND
      while #out < MAX_GRANTS do
        local best = redis.call('ZRANGEBYSCORE', K_BANDS, lo, '(' .. (lo + BAND), 'LIMIT', 0, 1)[1]
        if not best or not serve(g, best, out) then break end
      end
    end
  end
  return out
end

-- Lanes blocked on keys that gained room go back to the band of that gate.
local function wake(freed)
  for _, pair in ipairs(freed.keys) do
    local prefix = pair[1] .. SEP .. pair[2] .. SEP
    local members = redis.call('ZRANGEBYLEX', K_BLOCKED, '[' .. prefix, '[' .. prefix .. '\255')
    for _, m in ipairs(members) do
      local lane = string.sub(m, #prefix + 1)
      local L = load_lane(lane)
      redis.call('ZREM', K_BLOCKED, m)
      if L then
        L.wait = nil
        wait_in_band(lane, L, gate(pair[1]))
      end
    end
  end
  return freed.gates
end

-- The earliest start time waiting, kept in the state hash so that most scripts need not
-- look at the delayed set.
local function note_due(ms)
  if not NEXT_DUE or ms < NEXT_DUE then
    NEXT_DUE = ms
    redis.call('HSET', K_STATE, 'next_due', ms)
  end
  due(ms)
end

-- Calls whose start time has come join the end of their lane. Returns gates to pump. Only
-- when one is due by next_due, unless `always` (the tick, which also repairs next_due).
local function promote(always)
  local names = {}
  if not always and (not NEXT_DUE or NEXT_DUE > NOW) then return names end
  local due = redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', NOW, 'LIMIT', 0, PROMOTE_BATCH)
  for _, id in ipairs(due) do
    redis.call('ZREM', K_DELAYED, id)
    local rec = load(id)
    if rec and rec.state == 'waiting' then
      rec.ready_ms = 0
      -- A retry keeps its place among the calls of its priority; a call whose start time came
      -- counts from now.
      if rec.retry then rec.seq = rec.order else rec.seq, rec.order = nil, nil end
      local name = park(id, rec, nil, nil, nil, 'due')
      if name then names[#names + 1] = name end
      names[#names + 1] = rec.gates[1]
    elseif rec == false then
      local out = {}
      set_aside(id, out)
      redis.call('HDEL', K_CALLS, id)
      redis.call('HDEL', K_MESSAGES, id)
    end
  end
  local first = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
  if first[1] then
    NEXT_DUE = tonumber(first[2])
    redis.call('HSET', K_STATE, 'next_due', first[2])
  elseif NEXT_DUE then
    NEXT_DUE = nil
    redis.call('HDEL', K_STATE, 'next_due')
  end
  return names
end


local function all_gates()
  return split(redis.call('HGET', K_STATE, 'gates') or '', ',')
end

local function limits_of(names)
  local out = {}
  for i, name in ipairs(names) do out[i] = tostring(gate(name).limit or '') end
  return table.concat(out, ',')
end

-- Requirements (workflows): a call with `needs` waits in state 'needs' (public WAITING),
-- taking nothing, until the last one ended. Each requirement lists its dependents in the
-- dependents hash of its own group; its end serves those of this group in the same step and
-- tells other groups through the reply (and the outbox, should that process die first).
local RS = string.char(30)
local OUTBOX_RETRY_MS = 10000

local function keep_history(id, rec, final, info)
  local ttl = HISTORY_MS
  if ttl <= 0 then return end
  local h = {task = rec.task, state = final, events = rec.events, end_ms = NOW,
    gates = rec.gates, keys = rec.keys, fence = rec.fence, reason = info.reason,
    error = info.text, needs = rec.needs}
  redis.call('HSET', K_HISTORY, id, cjson.encode(h))
  redis.call('ZADD', K_DONE, NOW + ttl, id) -- score: when it is forgotten
  local old = redis.call('ZRANGEBYSCORE', K_DONE, '-inf', NOW, 'LIMIT', 0, 100)
  if #old > 0 then
    redis.call('HDEL', K_HISTORY, unpack(old))
    redis.call('ZREM', K_DONE, unpack(old))
  end
  -- Every entry lives ttl: the keys outlive the newest by ttl, so an idle group's go too.
  redis.call('PEXPIRE', K_HISTORY, ttl)
  redis.call('PEXPIRE', K_DONE, ttl)
end

-- Grant a call that competes now, when no call of its lane waits and it fits: returns its
-- fence, or nil and where it must wait ('lane' behind its lane, 'gate', 'key', 'recover').
local function try_grant(id, rec)
  if PARKED > 0 and redis.call('HEXISTS', K_LANES, lane_of(rec)) == 1 then return nil, 'lane' end
  local verdict, g, key = fits(rec, nil, nil)
  if verdict ~= 'ok' then return nil, verdict, g, key end
  rec.order = redis.call('HINCRBY', K_STATE, 'seq', 1)
  return grant(id, rec, 'granted')
end

-- Park a call where try_grant said it must wait (behind its lane: its first gate's band).
local function park_at(id, rec, verdict, g, key, event)
  if verdict == 'gate' or verdict == 'key' then
    park(id, rec, verdict, g, key, event)
  else
    park(id, rec, 'gate', gate(rec.gates[1]), nil, event)
  end
end

-- A waiting call may now compete for its gates, like a new one.
local function admit(id, rec, event)
  if rec.state == 'needs' then redis.call('HINCRBY', K_STATE, 'needs', -1) end
  if (tonumber(rec.ready_ms) or 0) > NOW then
    rec.state = 'waiting'
    save(id, rec)
    redis.call('ZADD', K_DELAYED, rec.ready_ms, id)
    note_due(rec.ready_ms)
    return
  end
  rec.ready_ms = 0
  local fence, verdict, g, key = try_grant(id, rec)
  if fence then
    local message = redis.call('HGET', K_MESSAGES, id) or ''
    FOLLOW[#FOLLOW + 1] = handed(id, fence, message, inputs_of(rec))
    count(rec.gates, 'dispatched')
  else
    park_at(id, rec, verdict, g, key, event)
  end
end

local satisfy

-- A call ended, or will never run: keep its history, settle its dependents, forget it.
-- info: reason, text (its error as text), payload (its encoded result or error).
local function finish(id, rec, final, event, info)
  info = info or {}
  if rec then
    note(id, rec, final, event)
    if final ~= 'SUCCEEDED' and final ~= 'FAILED' then count(rec.gates, string.lower(final)) end
    -- Sent ahead of a grant it never got (purged, expired, replaced): its copy in the broker
    -- or in a worker's hands must be refused, not sent through the gate again.
    if rec.ahead then tombstone(id, tonumber(rec.dedupe_ms) or 3600000) end
  end
  local raw = redis.call('HGET', K_DEPENDENTS, id)
  if raw then
    redis.call('HDEL', K_DEPENDENTS, id)
    local task = (rec and rec.task) or info.task or ''
    for _, entry in ipairs(split(raw, RS)) do
      local at = string.find(entry, SEP, 1, true)
      local group, dep = string.sub(entry, 1, at - 1), string.sub(entry, at + 1)
      if group == GROUP then
        satisfy(dep, id, task, final, info)
      else
        local notice = cjson.encode({tag = group, dep = dep, req = id, state = final,
          payload = info.payload or '', text = info.text or '', task = task})
        redis.call('ZADD', K_OUTBOX, NOW + OUTBOX_RETRY_MS, notice)
        due(NOW + OUTBOX_RETRY_MS)
        FOLLOW[#FOLLOW + 1] = {TAG_NOTE, group, dep, id, final, info.payload or '',
          info.text or '', task, notice}
      end
    end
  end
  if rec then
    keep_history(id, rec, final, info)
    forget(id, rec)
  end
end

-- A waiting dependent that will not run: reported (Python stores its result), then ended.
local function end_dependent(dep, rec, final, cause_id, cause_task, cause_text)
  local message = redis.call('HGET', K_MESSAGES, dep) or ''
  local track = 0
  if rec.track then track = 1 end
  FOLLOW[#FOLLOW + 1] = {TAG_END, dep, final, rec.task or '', cause_id, cause_task, cause_text,
    message, track}
  local text = 'RequirementFailed: ' .. cause_task .. '[' .. cause_id .. '] ' .. cause_text
  if final == 'CANCELLED' then text = 'cancelled: requirement ' .. cause_id .. ' ' .. cause_text end
  finish(dep, rec, final, 'requirement', {reason = cause_id, text = text})
end

-- Requirement `rid` of waiting call `dep` (of this group) ended in state `final`.
satisfy = function(dep, rid, rtask, final, info)
  local rec = load(dep)
  if not rec or rec.state ~= 'needs' then return false end
  rec.met = rec.met or {}
  if rec.met[rid] then return false end
  local index
  for i, r in ipairs(rec.needs) do if r == rid then index = i end end
  if not index then return false end
  rec.met[rid] = true
  rec.inputs = rec.inputs or {}
  if final == 'SUCCEEDED' then
    if info.payload and info.payload ~= '' then rec.inputs[tostring(index)] = 'v' .. info.payload end
  elseif final == 'FAILED' and rec.on_fail == 'pass' then
    if info.payload and info.payload ~= '' then
      rec.inputs[tostring(index)] = 'e' .. info.payload
    else
      rec.inputs[tostring(index)] = 'x' .. cjson.encode({rtask, rid, info.text or ''})
    end
  elseif final == 'FAILED' and rec.on_fail == 'cancel' then
    end_dependent(dep, rec, 'CANCELLED', rid, rtask, 'failed: ' .. (info.text or ''))
    return true
  elseif final == 'FAILED' then
    end_dependent(dep, rec, 'FAILED', rid, rtask, info.text or '')
    return true
  else
    end_dependent(dep, rec, 'CANCELLED', rid, rtask, string.lower(final))
    return true
  end
  for _, r in ipairs(rec.needs) do
    if not rec.met[r] then
      save(dep, rec)
      return true
    end
  end
  admit(dep, rec, 'met')
  return true
end

-- Parked calls whose wait_timeout passed leave their lanes; returns {id, waited ms, message,
-- first gate}.
local function expire(out)
  local due = redis.call('ZRANGEBYSCORE', K_EXPIRES, '-inf', NOW, 'LIMIT', 0, PROMOTE_BATCH)
  for _, id in ipairs(due) do
    local rec = load(id)
    if rec and rec.state == 'parked' then
      local message = redis.call('HGET', K_MESSAGES, id) or ''
      out[#out + 1] = {id, NOW - (tonumber(rec.parked_ms) or NOW), message, rec.gates[1]}
      finish(id, rec, 'EXPIRED', 'wait_timeout', {reason = 'wait_timeout'})
    else
      redis.call('ZREM', K_EXPIRES, id)
    end
  end
  return out
end
