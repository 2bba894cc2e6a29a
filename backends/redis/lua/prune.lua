-- Removes a feed stream's entries with ids below ARGV[1] (<µs>-0) and records
-- the greatest id removed in the marker: a cursor below it points into removed
-- changes, and new ids stay above it.
-- KEYS: feed, feed marker. Returns how many entries went.
local last = redis.call('XREVRANGE', KEYS[1], '(' .. ARGV[1], '-', 'COUNT', 1)[1]
if not last then return 0 end
local removed = redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
redis.call('SET', KEYS[2], last[1])  -- above the marker: entries below it were removed before
return removed
