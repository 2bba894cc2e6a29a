-- One member's part of a rebuilt feed: each of its events, in precedence order
-- (oldest first; for equal times accepted before declined, then by request id),
-- appended as a change with versions 1..n; its state value gets the count n.
-- KEYS: current, history, feed, feed marker. ARGV: correlation id.
-- Returns n.
local history = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local events = {}
for i = 1, #history, 2 do
  local head, rest = string.match(history[i], '^([^\n]*)\n?(.*)$')
  local rid, status, source = string.match(head, '^(.*) (%a+) ([^ ]+)$')
  local client = string.gsub(string.match(rest, '^[^\n]*'), '\\(.)',
                             function(c) return c == 'n' and '\n' or c end)
  local us = history[i + 1]
  if string.find(us, '[eE.]') then us = string.format('%.0f', tonumber(us)) end
  events[#events + 1] = {us = us, declined = status == 'declined' and '1' or '0', rid = rid,
                         source = source, client = client}
end
table.sort(events, function(a, b)
  if a.us ~= b.us then return greater(b.us, a.us) end
  if a.declined ~= b.declined then return a.declined == '0' end
  return after(b.rid, a.rid)
end)
local previous = nil
for version, e in ipairs(events) do
  append(KEYS[3], KEYS[4], ARGV[1], e.us, e.declined, previous, e.rid, e.source, e.client,
         version)
  previous = e.declined
end
local n = #events
if n > 0 then
  local last = events[n]
  redis.call('SET', KEYS[1], last.us .. last.declined .. (n > 1 and ':' .. n or ''))
end
return n
