-- registry_beat: one heartbeat of one instance. ARGV: prefix, agent id, instance id, interval ms
-- KEYS[1] the registry's agents hash: it names the slot (every key shares the {registry} hash tag)
-- Returns the server ms, or false if the agent is not registered (the instance registers again).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix, agent, instance, interval = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if redis.call('HEXISTS', prefix .. ':agents', agent) == 0 then return false end
local inst = prefix .. ':inst:' .. agent
local deadline = now + 3 * interval
redis.call('ZADD', inst, deadline, instance)
redis.call('ZREMRANGEBYSCORE', inst, '-inf', now)  -- instances that stopped beating
redis.call('ZADD', prefix .. ':deadlines', 'GT', deadline, agent)
redis.call('HSET', prefix .. ':seen', agent, now)
redis.call('HSET', prefix .. ':instcount', agent, redis.call('ZCARD', inst))
return tostring(now)
