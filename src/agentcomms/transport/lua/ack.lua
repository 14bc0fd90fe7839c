-- ack: acknowledge handled messages and remove them from the inbox, together.
-- KEYS[1] inbox stream; ARGV: group, event channel ('' = none), then the entry ids
-- XDEL alone would leave a dangling pending entry; XACK alone would leave the entry in the stream.
-- Returns how many were acknowledged. Safe to repeat.
local function listened(channel)
  return channel ~= '' and redis.call('PUBSUB', 'NUMSUB', channel)[2] > 0
end
local function event(kind, body, ts)
  local ok, m = pcall(cjson.decode, body)
  if not ok or type(m) ~= 'table' then return nil end
  return cjson.encode({event = kind, message_id = m.message_id, sender_id = m.sender_id,
                       recipient_id = m.recipient_id, intent = m.intent, ts = ts})
end
if listened(ARGV[2]) then
  local t = redis.call('TIME')
  local ts, events = tonumber(t[1]) + tonumber(t[2]) / 1e6, {}
  for i = 3, #ARGV do
    local entry = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])[1]
    if entry and entry[2][1] == 'm' then events[#events + 1] = event('handled', entry[2][2], ts) end
  end
  if #events > 0 then redis.call('PUBLISH', ARGV[2], table.concat(events, '\n')) end
end
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 3))
redis.call('XDEL', KEYS[1], unpack(ARGV, 3))
return acked
