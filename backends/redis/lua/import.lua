-- Many events, of any members (one server or Sentinel: not Cluster, whose
-- scripts reach one slot). KEYS: current and history of each event in turn.
-- ARGV: 1 to touch (as in set.lua), then µs, history member, state value,
--       1 if declined, request id of each event.
-- Returns how many events were added. Each event is read, checked and written
-- in turn, so each is all or nothing.
local touch = ARGV[1] == '1'
local added = 0
for i = 1, #KEYS, 2 do
  local a = (i - 1) / 2 * 5 + 1
  local current, cur_us, cur_declined = state(KEYS[i])
  local _, new = apply(KEYS[i], KEYS[i + 1], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
                       ARGV[a + 4], ARGV[a + 5], current, cur_us, cur_declined)
  if new == 0 and touch and current then redis.call('SET', KEYS[i], current, 'KEEPTTL') end
  added = added + new
end
return added
