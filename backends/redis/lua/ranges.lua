-- The events of each history key in KEYS at or after ARGV[1] µs: for each key,
-- a flat list of member, score... (one call per SCAN page instead of one per key).
local found = {}
for i, key in ipairs(KEYS) do
  found[i] = redis.call('ZRANGEBYSCORE', key, ARGV[1], '+inf', 'WITHSCORES')
end
return found
