-- send: put messages into one inbox stream, suppressing duplicates by message id.
-- KEYS[1] inbox stream, KEYS[2] the inbox's dedup set (message id -> server ms when accepted),
-- KEYS[3] the agent's dead-letter stream (used only to clear a hostile entry id, see below)
-- ARGV: max length, dedup window ms (0 = no dedup), event channel ('' = none), n,
--       inbox TTL ms (0 = none: the recipient is registered), then n message ids, then n bodies,
--       then (optional, all or none) n authentication tokens ('' = none; stored as the entry's field 'a' beside 'm')
-- Returns per message its entry id, or 'dup', or 'full <length>'; then one more element:
-- how many hostile entries (ids more than a day ahead) were moved to the dead letters (0 almost always).
-- With Redis ACLs (Redis 7), a NOPERM error before anything is written when the caller's user may not
-- set the TTL (inbox TTL > 0) or repair an inbox blocked by a hostile entry id (only an admin may).
-- No consumer group is made here: a stream keeps every entry, and a consumer creates its group at 0.
-- The dedup set is read and written once per call (ZMSCORE, ZADD), not once per message. Its member
-- '~' (never a message id) holds when its TTL was last set and its expired ids were last dropped:
-- that housekeeping runs on the call that creates the set and then once per tenth of the window.
local function listened(channel)
  -- the feed costs nothing while nobody listens: events are built only if the channel has a subscriber
  return channel ~= '' and redis.call('PUBSUB', 'NUMSUB', channel)[2] > 0
end
local function event(kind, body, ts)
  local ok, m = pcall(cjson.decode, body)
  if not ok or type(m) ~= 'table' then return nil end
  return cjson.encode({event = kind, message_id = m.message_id, sender_id = m.sender_id,
                       recipient_id = m.recipient_id, intent = m.intent, ts = ts})
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local moved = 0
local function clear_future_ids(inbox, dead)
  -- An entry written with the last possible id (or any id far in the future) by a hostile or broken
  -- client makes every later XADD * fail. Move such entries to the dead letters, then set the stream's
  -- and its groups' last ids back to the newest remaining entry.
  local from = (now_ms() + 86400000) .. '-0'
  for _, e in ipairs(redis.call('XRANGE', inbox, from, '+')) do
    local f, body, auth = e[2], '', ''
    for i = 1, #f, 2 do
      if f[i] == 'm' then body = f[i + 1] elseif f[i] == 'a' then auth = f[i + 1] end
    end
    redis.call('XADD', dead, '*', 'reason', 'hostile entry id ' .. e[1] .. ': dated more than a day ahead',
               'deliveries', '0', 'source', inbox, 'source_id', e[1], 'payload', body, 'auth', auth)
    redis.call('XDEL', inbox, e[1])
    moved = moved + 1
  end
  local top = redis.call('XREVRANGE', inbox, '+', '-', 'COUNT', 1)[1]
  local last = top and top[1] or '0-1'
  redis.call('XSETID', inbox, last)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', inbox)) do
    local name, delivered
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then delivered = g[i + 1] end
    end
    local dms, dseq = string.match(delivered, '^(%d+)-(%d+)$')
    local lms, lseq = string.match(last, '^(%d+)-(%d+)$')
    if #dms > #lms or (#dms == #lms and (dms > lms or (dms == lms and tonumber(dseq) > tonumber(lseq)))) then
      redis.call('XGROUP', 'SETID', inbox, name, last)
    end
  end
end
local function allowed(...)
  -- whether the caller's ACL user may run this command (Redis 7); Redis 6.2 cannot say: try it
  if redis.acl_check_cmd == nil then return true end
  return redis.acl_check_cmd(...)
end
local function may_repair(inbox)
  -- what clear_future_ids runs; a sender's ACL user usually may not (the recipient's agent or an admin may)
  return allowed('XRANGE', inbox, '-', '+') and allowed('XDEL', inbox, '0-1') and allowed('XSETID', inbox, '0-1')
     and allowed('XADD', KEYS[3], '*', 'm', '') and allowed('XINFO', 'GROUPS', inbox)
     and allowed('XGROUP', 'SETID', inbox, 'agents', '0')
end
local checked = false
local function xadd(inbox, body, token)
  if token ~= nil and token ~= '' then return redis.pcall('XADD', inbox, '*', 'm', body, 'a', token) end
  return redis.pcall('XADD', inbox, '*', 'm', body)
end
local function add(inbox, body, token)
  local id = xadd(inbox, body, token)
  if type(id) == 'table' and id.err then
    if string.find(id.err, 'exhausted', 1, true) then
      if not may_repair(inbox) then
        return redis.error_reply('NOPERM ' .. inbox .. ' is blocked by an entry with the last possible id ' ..
                                 '(a hostile client); this user may not repair it: a send by an admin does')
      end
      clear_future_ids(inbox, KEYS[3])
      checked = true
    end
    id = xadd(inbox, body, token)
    if type(id) == 'table' and id.err then return redis.error_reply(id.err) end  -- another error (OOM ...)
  end
  if not checked then
    -- once per call: an id more than a day ahead of the server's clock means the stream's last id
    -- was set by a hostile entry (just below the last possible one, say): clear it, add again
    checked = true
    if tonumber(string.match(id, '^(%d+)')) > now_ms() + 86400000 and may_repair(inbox) then
      redis.call('XDEL', inbox, id)
      clear_future_ids(inbox, KEYS[3])
      id = xadd(inbox, body, token)
      if type(id) == 'table' and id.err then return redis.error_reply(id.err) end
    end
  end
  return id
end

local max, window, channel, n = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local first = 6
if ttl > 0 and not allowed('PEXPIRE', KEYS[1], '1') then  -- refused before anything is written
  return redis.error_reply('NOPERM this user may not send to an unregistered id (the send sets a TTL on ' ..
                           KEYS[1] .. '): the agent registers first, or an admin sends')
end
local len = redis.call('XLEN', KEYS[1])
local known, now = {}, nil
if window > 0 then
  known = redis.call('ZMSCORE', KEYS[2], '~', unpack(ARGV, first, first + n - 1))
  for i = 2, n + 1 do
    if known[i] and not now then now = now_ms() end  -- only a known id needs the clock: is it older than the window?
  end
end
local feed = listened(channel)
local ts
if feed then ts = now_ms() / 1000 end
local out, events, marks, here, last = {}, {}, {}, {}, nil
for i = 1, n do
  local id, body, token = ARGV[first + i - 1], ARGV[first + n + i - 1], ARGV[first + 2 * n + i - 1]
  local seen = known[i + 1]
  if window > 0 and ((seen and tonumber(seen) >= now - window) or here[id]) then
    out[i] = 'dup'
  elseif len >= max then
    out[i] = 'full ' .. len
  else
    last = add(KEYS[1], body, token)
    if type(last) == 'table' then return last end  -- an error reply: raised to the caller
    out[i] = last
    len = len + 1
    if window > 0 then
      here[id] = true
      marks[#marks + 1] = id
    end
    if feed then events[#events + 1] = event('sent', body, ts) end
  end
end
if last and ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end  -- an inbox of an unregistered id expires unread
if #marks > 0 then
  local ms = tonumber(string.match(last, '^(%d+)'))  -- the server's clock, as the entry id holds it
  local args = {}
  for i = 1, #marks do
    args[2 * i - 1], args[2 * i] = ms, marks[i]
  end
  local housekeeping = not known[1] or tonumber(known[1]) < ms - window / 10
  if housekeeping then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (ms - window))
    args[#args + 1], args[#args + 2] = ms, '~'
  end
  redis.call('ZADD', KEYS[2], unpack(args))
  -- after the ZADD, which may have created the set: a TTL set before it would be lost
  if housekeeping then redis.call('PEXPIRE', KEYS[2], window + window / 10) end
end
-- one feed message for the whole call: one JSON event per line
if #events > 0 then redis.call('PUBLISH', channel, table.concat(events, '\n')) end
out[n + 1] = moved
return out
