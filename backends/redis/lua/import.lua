-- Many events, of any members (one server or Sentinel: not Cluster, whose
-- scripts reach one slot), applied in the order given.
-- KEYS: feed, feed marker, then current and history of each event in turn.
-- ARGV: 1 to touch (as in set.lua), then each event's µs, history member, state
--       value, 1 if declined, request id, correlation id, source, client.
-- Returns how many events were added. Each event is read, checked and written
-- in turn, so each is all or nothing, its change included.
local touch = ARGV[1] == '1'
local added = 0
local keys, args = {false, false, KEYS[1], KEYS[2]}, {}
for i = 3, #KEYS, 2 do
  local a = (i - 3) / 2 * 8 + 1
  keys[1], keys[2] = KEYS[i], KEYS[i + 1]
  for j = 1, 8 do args[j] = ARGV[a + j] end
  local current, cur_us, cur_declined, cur_version = state(KEYS[i])
  local _, new = apply(keys, args, current, cur_us, cur_declined, cur_version)
  if new == 0 and touch and current then redis.call('SET', KEYS[i], current, 'KEEPTTL') end
  added = added + new
end
return added
