-- One write.
-- KEYS: current, history, feed, feed marker[, idempotency key]
-- ARGV: µs, history member, state value, 1 if declined, request id, correlation
--       id, source, client, fingerprint, key TTL (s)[, 1 to touch: write the
--       current state back when nothing else was written, so that a WAIT after a
--       replay also covers the write replayed]
-- Returns {1, state, added, member} after a write, {0, state, 0, member} for a
-- replay, {-1} on key reuse; member: the current event's history member, or nil
-- when the event written is the current state.
local touch = ARGV[11] == '1'
local idempotency = KEYS[5]
local current, cur_us, cur_declined, cur_version = state(KEYS[1])
if idempotency then
  local seen = redis.call('GET', idempotency)
  if seen then
    if seen ~= ARGV[9] then return {-1} end
    if not current then return {0, false, 0, false} end
    if touch then redis.call('SET', KEYS[1], current, 'KEEPTTL') end
    return {0, current, 0, event_of(KEYS[2], cur_us, cur_declined)}
  end
end
local added, replaced
current, added, replaced = apply(KEYS, ARGV, current, cur_us, cur_declined, cur_version)
if added == 0 and touch and current and not idempotency then
  redis.call('SET', KEYS[1], current, 'KEEPTTL')
end
if idempotency then redis.call('SET', idempotency, ARGV[9], 'EX', ARGV[10]) end
if replaced or not current then return {1, current or false, added, false} end
local _, us, declined = state(KEYS[1])
return {1, current, added, event_of(KEYS[2], us, declined)}
