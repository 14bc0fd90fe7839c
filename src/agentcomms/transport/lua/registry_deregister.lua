-- registry_deregister: remove an agent and its index entries. ARGV: prefix, agent id
-- KEYS[1] the registry's agents hash: it names the slot (every key shares the {registry} hash tag)
-- Returns 1 if it was registered, else 0.
local prefix, agent = ARGV[1], ARGV[2]
if redis.call('HEXISTS', prefix .. ':agents', agent) == 0 then return 0 end
local indexes = redis.call('HGET', prefix .. ':indexes', agent)
if indexes then
  local ok, keys = pcall(cjson.decode, indexes)
  if ok and type(keys) == 'table' then
    for _, key in ipairs(keys) do redis.call('SREM', key, agent) end
  end
end
for _, hash in ipairs({'agents', 'indexes', 'seen', 'instcount', 'status', 'started'}) do
  redis.call('HDEL', prefix .. ':' .. hash, agent)
end
redis.call('ZREM', prefix .. ':deadlines', agent)
redis.call('DEL', prefix .. ':inst:' .. agent)
return 1
