-- registry_stats: per agent its role, department and whether it is online. ARGV: prefix
-- KEYS[1] the registry's agents hash: it names the slot (every key shares the {registry} hash tag)
-- Walks every agent: O(number of agents), for dashboards, not for hot paths.
-- Returns {server ms, then per agent: id, role, department, online '1'/'0'}; a record that is not
-- valid JSON gives an empty role and department (the client counts and logs it).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1]
local all = redis.call('HGETALL', prefix .. ':agents')
local out = {tostring(now)}
for i = 1, #all, 2 do
  local ok, info = pcall(cjson.decode, all[i + 1])
  local role, department = '', ''
  if ok and type(info) == 'table' then
    if type(info['role']) == 'string' then role = info['role'] end
    if type(info['department']) == 'string' then department = info['department'] end
  end
  local deadline = tonumber(redis.call('ZSCORE', prefix .. ':deadlines', all[i]) or '0')
  table.insert(out, all[i])
  table.insert(out, role)
  table.insert(out, department)
  table.insert(out, deadline > now and '1' or '0')
end
return out
