-- Functions shared by the write and read scripts (put in front of each one).
--
-- A state value is <µs><0|1>[:<version>] (1 if declined; the member's change
-- count, absent when it is 1, so a member who answered once keeps a value of
-- digits only, which Redis stores as an integer); µs are compared as decimal
-- strings, never as Lua numbers (doubles: inexact beyond 2^53).
-- state(key): a member's current state: the value, its µs, its declined flag and
--   its version (nil if none; an error, before any write, if unparsable).
-- event_of(history, us, declined): the history member of the current event.
-- append(feed, marker, ...): appends one change to a feed stream; its id is
--   <µs of the server's clock>-<n>, greater than every id the stream gave out
--   (the last entry's, else the marker's: the greatest id a prune removed).
-- apply(...): stores one event unless it is stored already (an event is its
--   member, time and request id: one already stored is skipped whole) and makes
--   it the current state if it takes precedence: newer; as new and declined over
--   accepted; then the greater request id. An event that becomes the current
--   state appends its change to the feed. Returns the current value, 1 if the
--   event was added (else 0), and whether the event is now the current state.

local function state(key)
  local current = redis.call('GET', key)
  if not current then return nil end
  local us, declined = string.match(current, '^(%-?%d+)([01])$')
  local version = '1'
  if not us then us, declined, version = string.match(current, '^(%-?%d+)([01]):(%d+)$') end
  if not us then error({err = 'ERR unparsable opt-in state in ' .. key}) end
  return current, us, declined, tonumber(version)
end

-- a > b byte by byte, as Python compares the ids: Lua's > uses strcoll, which
-- follows redis-server's locale (under en_US, 'B' sorts after 'a')
local function after(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return #a > #b
end

-- a > b, for integers written in decimal without leading zeros
local function greater(a, b)
  local a_negative, b_negative = string.sub(a, 1, 1) == '-', string.sub(b, 1, 1) == '-'
  if a_negative ~= b_negative then return b_negative end
  if #a ~= #b then return (#a > #b) ~= a_negative end
  if a == b then return false end
  return after(a, b) ~= a_negative
end

-- The request id and member of the current event among the members at its µs:
-- of those with its status, the greatest request id.
local function newest(members, declined)
  local status = declined == '1' and 'declined' or 'accepted'
  local best_rid, best
  for _, member in ipairs(members) do
    local rid, their_status = string.match(member, '^([^\n]*) (%a+) [^ \n]+')
    if their_status == status and (not best_rid or after(rid, best_rid)) then
      best_rid, best = rid, member
    end
  end
  return best_rid, best
end

local function event_of(history, us, declined)
  local _, member = newest(redis.call('ZRANGEBYSCORE', history, us, us), declined)
  return member or false
end

local function status_of(declined)
  return declined == '1' and 'declined' or 'accepted'
end

local function append(feed, marker, cid, us, declined, previous, rid, source, client, version)
  local time = redis.call('TIME')
  local now = time[1] .. string.format('%06d', tonumber(time[2]))
  local top = redis.call('XREVRANGE', feed, '+', '-', 'COUNT', 1)[1]
  local top_id = top and top[1] or redis.call('GET', marker)
  local id = now .. '-0'
  if top_id then
    local top_us, top_n = string.match(top_id, '^(%d+)-(%d+)$')
    if not greater(now, top_us) then  -- the clock stepped back, or the same µs
      id = top_us .. '-' .. string.format('%d', tonumber(top_n) + 1)
    end
  end
  redis.call('XADD', feed, id, 'correlation_id', cid, 'us', us, 'status', status_of(declined),
             'previous', previous and status_of(previous) or '', 'request_id', rid,
             'source', source, 'client', client, 'version', version)
end

-- KEYS of one event: current, history, feed, marker; ARGV: µs, history member,
-- state value, declined, request id, correlation id, source, client.
local function apply(keys, args, current, cur_us, cur_declined, cur_version)
  local key, history = keys[1], keys[2]
  local us, member, value, declined, rid = args[1], args[2], args[3], args[4], args[5]
  local same_time = redis.call('ZRANGEBYSCORE', history, us, us)
  for _, stored in ipairs(same_time) do
    local head = string.match(stored, '^[^\n]*')
    if string.match(head, '^(.*) [^ ]+ [^ ]+$') == rid then return current, 0, false end
  end
  local replace = not current
  if current then
    if us ~= cur_us then
      replace = greater(us, cur_us)
    elseif declined ~= cur_declined then
      replace = declined == '1'
    else  -- the current event is among same_time
      replace = after(rid, newest(same_time, cur_declined) or '')
    end
  end
  if redis.call('ZSCORE', history, member) then
    -- The same words at another time: another event, kept apart by its time.
    if not string.find(member, '\n', 1, true) then member = member .. '\n' end
    member = member .. '\n' .. us
  end
  redis.call('ZADD', history, us, member)
  if replace then
    local version = current and cur_version + 1 or 1
    if version > 1 then value = value .. ':' .. version end
    redis.call('SET', key, value)
    append(keys[3], keys[4], args[6], us, declined, current and cur_declined, rid, args[7],
           args[8], version)
    current = value
  end
  return current, 1, replace
end
