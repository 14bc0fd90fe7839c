-- registry_register: register (or update) an agent and count one instance as a first heartbeat.
-- KEYS[1] the registry's agents hash: it names the slot (every other key is built from the prefix and shares
--   the {registry} hash tag, so a cluster runs the script on the primary that holds them all)
-- ARGV: prefix, agent id, record JSON, role index key (the role case-folded, by the client),
--       replace ('1'/'0'), instance id, heartbeat interval ms, index keys JSON (role index first)
-- Returns {'ok', server ms} or {'conflict', the registered role}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function beat(prefix, agent, instance, interval)
  local inst = prefix .. ':inst:' .. agent
  local deadline = now + 3 * interval
  redis.call('ZADD', inst, deadline, instance)
  redis.call('ZREMRANGEBYSCORE', inst, '-inf', now)  -- instances that stopped beating
  redis.call('ZADD', prefix .. ':deadlines', 'GT', deadline, agent)
  redis.call('HSET', prefix .. ':seen', agent, now)
  redis.call('HSET', prefix .. ':instcount', agent, redis.call('ZCARD', inst))
end
local prefix, agent = ARGV[1], ARGV[2]
local old_indexes = redis.call('HGET', prefix .. ':indexes', agent)
local old_keys = {}
if old_indexes then
  local ok, decoded = pcall(cjson.decode, old_indexes)
  if ok and type(decoded) == 'table' then old_keys = decoded end
end
if ARGV[5] ~= '1' and old_keys[1] and old_keys[1] ~= ARGV[4] then
  -- the role is compared as the clients case-fold it (Lua's string.lower knows only ASCII)
  local old_role = old_keys[1]
  local ok, record = pcall(cjson.decode, redis.call('HGET', prefix .. ':agents', agent) or '')
  if ok and type(record) == 'table' and type(record['role']) == 'string' then old_role = record['role'] end
  return {'conflict', old_role}
end
for _, key in ipairs(old_keys) do redis.call('SREM', key, agent) end
for _, key in ipairs(cjson.decode(ARGV[8])) do redis.call('SADD', key, agent) end
redis.call('HSET', prefix .. ':agents', agent, ARGV[3])
redis.call('HSET', prefix .. ':indexes', agent, ARGV[8])
redis.call('HSETNX', prefix .. ':started', agent, now)
redis.call('HDEL', prefix .. ':status', agent)
beat(prefix, agent, ARGV[6], tonumber(ARGV[7]))
return {'ok', tostring(now)}
