-- registry_find: the records of the agents matching a query, with their presence.
-- KEYS[1] the registry's agents hash (it names the slot: every key here shares the {registry} hash tag),
--   then the index sets to intersect (none: all agents, or the online ones)
-- ARGV: prefix, online only ('1'/'0'), explicit ids (JSON list, or '' to use KEYS)
-- Returns {server ms, then per agent: id, record JSON, online '1'/'0', status, last beat ms,
-- live instances, first registration ms}. Records are returned as stored: the client validates them.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1]
local online_only = ARGV[2] == '1'
local deadlines = prefix .. ':deadlines'
local ids
if ARGV[3] ~= '' then
  ids = cjson.decode(ARGV[3])
elseif #KEYS > 1 then
  ids = redis.call('SINTER', unpack(KEYS, 2))   -- cost: the smallest set times the number of sets
elseif online_only then
  ids = redis.call('ZRANGE', deadlines, '(' .. now, '+inf', 'BYSCORE')
else
  ids = redis.call('HKEYS', prefix .. ':agents')
end
local out = {tostring(now)}
for _, id in ipairs(ids) do
  local info = redis.call('HGET', prefix .. ':agents', id)
  local deadline = tonumber(redis.call('ZSCORE', deadlines, id) or '0')
  local online = deadline > now
  if info and (online or not online_only) then
    table.insert(out, id)
    table.insert(out, info)
    table.insert(out, online and '1' or '0')
    table.insert(out, redis.call('HGET', prefix .. ':status', id) or '')
    table.insert(out, redis.call('HGET', prefix .. ':seen', id) or '')
    table.insert(out, redis.call('HGET', prefix .. ':instcount', id) or '0')
    table.insert(out, redis.call('HGET', prefix .. ':started', id) or '')
  end
end
return out
