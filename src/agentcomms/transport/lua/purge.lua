-- purge: delete an agent's dead letters. KEYS[1] dead-letter stream. Returns how many there were.
-- Not safe to repeat (a repeat would count 0): after a lost connection its outcome is unknown.
local count = redis.call('XLEN', KEYS[1])
redis.call('DEL', KEYS[1])
return count
