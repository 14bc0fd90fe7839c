-- registry_set_status: the status an online agent reports. ARGV: prefix, agent id, status
-- KEYS[1] the registry's agents hash: it names the slot (every key shares the {registry} hash tag)
-- Returns 1, or 0 if the agent is not registered.
if redis.call('HEXISTS', ARGV[1] .. ':agents', ARGV[2]) == 0 then return 0 end
redis.call('HSET', ARGV[1] .. ':status', ARGV[2], ARGV[3])
return 1
