-- dead_letter: move one inbox entry to the agent's dead-letter stream, with why.
-- KEYS[1] inbox stream, KEYS[2] dead-letter stream; while recording also KEYS[3] the agent's record stream
-- ARGV: group, entry id, reason, deliveries, consumer, min idle ms ('' = the caller holds the entry);
-- while recording also the record's size, its keys' TTL ms, and when the entry was delivered (server ms, '' = unknown)
-- Returns {dead-letter id, the entry's body ('' if it had no 'm' field), 'moved' or 'found'}:
-- 'found' when the entry had been moved already (a repeat of this call after a lost connection,
-- or another instance's move) and its dead letter is among the newest; false if there was
-- nothing to move and no such dead letter (another instance holds the entry).
local function already_moved()
  for _, e in ipairs(redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 100)) do
    local f, source, source_id, body = e[2], nil, nil, ''
    for i = 1, #f, 2 do
      if f[i] == 'source' then source = f[i + 1]
      elseif f[i] == 'source_id' then source_id = f[i + 1]
      elseif f[i] == 'payload' then body = f[i + 1] end
    end
    if source == KEYS[1] and source_id == ARGV[2] then return {e[1], body, 'found'} end
  end
  return false
end
if ARGV[6] ~= '' then
  -- claim first, so that of two instances only one dead-letters an abandoned entry
  local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[5], ARGV[6], ARGV[2], 'JUSTID')
  if #claimed == 0 then return already_moved() end
end
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if #entry == 0 and acked == 0 then return already_moved() end
local reason = ARGV[3]
if #entry == 0 then reason = reason .. ' (the entry was deleted while pending)' end
local out = {'reason', reason, 'deliveries', ARGV[4], 'source', KEYS[1], 'source_id', ARGV[2]}
local body, auth = nil, ''
if #entry == 1 then
  local f = entry[1][2]
  for i = 1, #f, 2 do
    if f[i] == 'm' then body = f[i + 1] elseif f[i] == 'a' then auth = f[i + 1] end
  end
  if body == nil then table.insert(out, 'raw'); table.insert(out, cjson.encode(f)) end
end
table.insert(out, 'payload'); table.insert(out, body or '')
table.insert(out, 'auth'); table.insert(out, auth)  -- kept, so that a redriven message is still authenticated
local id = redis.call('XADD', KEYS[2], '*', unpack(out))
redis.call('XDEL', KEYS[1], ARGV[2])
if #KEYS >= 3 then  -- the record: the message, why, and the dead letter it became (skipped if Redis refuses)
  local conversation = ''
  local ok, m = pcall(cjson.decode, body or '')
  if ok and type(m) == 'table' and type(m.conversation_id) == 'string' then conversation = m.conversation_id end
  local added = redis.pcall('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'k', 'x', 'i', ARGV[2], 'c', conversation,
                            'd', ARGV[9], 'm', body or '', 'why', reason, 'n', ARGV[4], 'dl', id)
  if type(added) == 'string' then redis.pcall('PEXPIRE', KEYS[3], ARGV[8]) end
end
return {id, body or '', 'moved'}
