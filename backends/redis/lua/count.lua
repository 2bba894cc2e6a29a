-- How many events the history keys in KEYS hold together.
local total = 0
for _, key in ipairs(KEYS) do total = total + redis.call('ZCARD', key) end
return total
