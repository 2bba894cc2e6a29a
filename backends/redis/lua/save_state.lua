-- A compare-and-set of one value. KEYS: the value's key.
-- ARGV: what must be stored first ('any', 'absent' or 'equal' to ARGV[2]), then
--       1 to delete or 0 to write ARGV[4].
-- Returns 1 if written, else 0.
local stored = redis.call('GET', KEYS[1])
if ARGV[1] == 'absent' and stored then return 0 end
if ARGV[1] == 'equal' and stored ~= ARGV[2] then return 0 end
if ARGV[3] == '1' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[4]) end
return 1
