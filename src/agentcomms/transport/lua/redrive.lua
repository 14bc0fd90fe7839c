-- redrive: move one dead letter back into an inbox, atomically; safe to repeat.
-- KEYS[1] dead-letter stream, KEYS[2] inbox stream, KEYS[3] the redrive's receipt (a string key)
-- ARGV: dead-letter entry id, max inbox length, receipt TTL ms, a new authentication token ('' = keep the
-- message's own: with security on, an admin signs the message afresh, or a late redrive is a replay)
-- Returns {'ok', new entry id}, {'full', length}, {'empty'} (no message to send back), or false
-- if the dead letter is gone (purged, or redriven longer ago than the receipt lives). The
-- receipt holds the new entry id for a while, so a repeat of a redrive that ran answers 'ok'.
local entry = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])[1]
if not entry then
  local done = redis.call('GET', KEYS[3])
  if done then return {'ok', done} end
  return false
end
local body, auth = '', ''
local f = entry[2]
for i = 1, #f, 2 do
  if f[i] == 'payload' then body = f[i + 1] elseif f[i] == 'auth' then auth = f[i + 1] end
end
if body == '' then return {'empty'} end
if ARGV[4] ~= nil and ARGV[4] ~= '' then auth = ARGV[4] end
local len = redis.call('XLEN', KEYS[2])
if len >= tonumber(ARGV[2]) then return {'full', len} end
local id
if auth ~= '' then id = redis.call('XADD', KEYS[2], '*', 'm', body, 'a', auth)
else id = redis.call('XADD', KEYS[2], '*', 'm', body) end
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('SET', KEYS[3], id, 'PX', ARGV[3])
return {'ok', id}
