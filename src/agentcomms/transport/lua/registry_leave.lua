-- registry_leave: one instance stops cleanly; the agent goes offline with its last one.
-- KEYS[1] the registry's agents hash: it names the slot (every key shares the {registry} hash tag)
-- ARGV: prefix, agent id, instance id. Returns the number of live instances left.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix, agent = ARGV[1], ARGV[2]
local inst = prefix .. ':inst:' .. agent
redis.call('ZREM', inst, ARGV[3])
redis.call('ZREMRANGEBYSCORE', inst, '-inf', now)
local top = redis.call('ZRANGE', inst, -1, -1, 'WITHSCORES')
if #top == 0 then
  redis.call('ZREM', prefix .. ':deadlines', agent)
else
  redis.call('ZADD', prefix .. ':deadlines', 'XX', top[2], agent)
end
if redis.call('HEXISTS', prefix .. ':agents', agent) == 1 then
  redis.call('HSET', prefix .. ':instcount', agent, redis.call('ZCARD', inst))
end
return #top
