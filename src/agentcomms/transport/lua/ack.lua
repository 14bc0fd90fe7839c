-- ack: acknowledge handled messages and remove them from the inbox, together; record them.
-- KEYS[1] inbox stream; while recording also KEYS[2] the agent's record stream.
-- ARGV: group, event channel ('' = none), record size (0 = not recording), housekeeping cutoff ms
-- (0 = none this call), the record keys' TTL ms; then per message its entry id, and while recording
-- also its conversation id, when it was delivered (server ms), its body as stored and its reply ('' = none).
-- XDEL alone would leave a dangling pending entry; XACK alone would leave the entry in the stream.
-- A message is recorded only if this call acknowledged it (it was pending), so a repeat of this call after
-- a lost connection records nothing twice. The entries are acknowledged and deleted before anything is
-- recorded, and a record write Redis refuses (its key of another type) is skipped and counted. (Under
-- maxmemory the record is written all the same: Redis lets a script that has written finish.)
-- Returns {how many were acknowledged, how many could not be recorded}. Safe to repeat.
local function listened(channel)
  return channel ~= '' and redis.call('PUBSUB', 'NUMSUB', channel)[2] > 0
end
local function event(kind, body, ts)
  local ok, m = pcall(cjson.decode, body)
  if not ok or type(m) ~= 'table' then return nil end
  return cjson.encode({event = kind, message_id = m.message_id, sender_id = m.sender_id,
                       recipient_id = m.recipient_id, intent = m.intent, ts = ts})
end
local keep, cutoff = tonumber(ARGV[3]), tonumber(ARGV[4])
local stride, first = keep > 0 and 5 or 1, 6
local ids, unrecorded = {}, 0
for i = first, #ARGV, stride do ids[#ids + 1] = ARGV[i] end
local feed = listened(ARGV[2])
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
-- the bodies to record (or publish): those of the entries this call acknowledged
local bodies = {}
if keep > 0 and acked > 0 then
  for j = 1, #ids do bodies[j] = ARGV[first + (j - 1) * stride + 3] end
  if acked < #ids then  -- some were not pending (a repeat of this call, or moved meanwhile): only those still here
    for j = 1, #ids do
      if #redis.call('XRANGE', KEYS[1], ids[j], ids[j]) == 0 then bodies[j] = nil end
    end
  end
elseif feed and acked > 0 then
  for j = 1, #ids do
    local entry = redis.call('XRANGE', KEYS[1], ids[j], ids[j])[1]
    if entry and entry[2][1] == 'm' then bodies[j] = entry[2][2] end
  end
end
redis.call('XDEL', KEYS[1], unpack(ids))
if feed or keep > 0 then
  local ts
  if feed then
    local t = redis.call('TIME')
    ts = tonumber(t[1]) + tonumber(t[2]) / 1e6
  end
  local events = {}
  for j = 1, #ids do
    local body = bodies[j]
    if body then
      if feed then events[#events + 1] = event('handled', body, ts) end
      if keep > 0 then
        local at = first + (j - 1) * stride
        local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', keep, '*', 'i', ids[j], 'c', ARGV[at + 1],
                                  'd', ARGV[at + 2], 'm', body, 'r', ARGV[at + 4])
        if type(added) == 'table' and added.err then unrecorded = unrecorded + 1 end
      end
    end
  end
  if #events > 0 then redis.call('PUBLISH', ARGV[2], table.concat(events, '\n')) end
  if keep > 0 and cutoff > 0 then  -- housekeeping: the record by age (exactly: once a minute) and size, the TTL
    -- (pcall: a record key of the wrong type, written by someone else, must not block acknowledgements)
    redis.pcall('XTRIM', KEYS[2], 'MINID', cutoff)
    redis.pcall('XTRIM', KEYS[2], 'MAXLEN', keep)
    redis.pcall('PEXPIRE', KEYS[2], ARGV[5])
  end
end
return {acked, unrecorded}
