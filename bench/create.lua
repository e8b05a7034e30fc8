-- wrk script: create sessions (POST /v1/sessions, the server picks the id), 100 users round-robin.
--   wrk -s bench/create.lua http://127.0.0.1:PORT -- <user-prefix>
-- done() prints one line "BENCH {json}" that bench/run.py parses.

local prefix = "bench-user-"
local counter = 0

function init(args)
  prefix = args[1] or prefix
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local body = '{"user_id":"' .. prefix .. (counter % 100) .. '","title":"bench session","settings":{"model":"m"}}'
  return wrk.format(nil, "/v1/sessions", nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
      .. '"p50_us":%d,"p99_us":%d,"body_bytes":0}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
