-- wrk script: PUT the opt-in of a random member, "accepted" or "declined".
-- Usage: wrk -s bench/put.lua http://127.0.0.1:PORT
-- Ids are drawn from a million members, so most PUTs create a member and some
-- update one. At the end, one JSON line (prefixed "BENCH ") for bench/load.py.

local counter = 0
local threads = {}

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() * 1000 + tid)
  headers = { ["Content-Type"] = "application/json" }
  bodies = { '{"LOYALTY_OPTIN": "accepted"}', '{"LOYALTY_OPTIN": "declined"}' }
end

function request()
  local path = string.format("/client/users/member-%07d/profile/optin", math.random(0, 999999))
  return wrk.format("PUT", path, headers, bodies[math.random(1, 2)])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
