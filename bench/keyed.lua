-- wrk script: POST ~300-byte messages, each with its own Idempotency-Key, and stop after N answers.
--   wrk -s bench/keyed.lua http://127.0.0.1:PORT -- <session-id-prefix> <sessions> <count> <key-prefix> <done-file>
-- Request n goes to session <prefix>(n % sessions) with key <key-prefix>n (n from 1), so a
-- client that knows n can replay it. Run with one wrk thread: the counter is per thread.
-- After <count> answers the thread stops and creates <done-file>: wrk itself would wait out
-- its -d, so bench/run.py sends it SIGINT then (wrk prints its summary on SIGINT).
-- done() prints one line "BENCH {json}" that bench/run.py parses.

local prefix = "bench-"
local sessions = 64
local count = 50000
local key_prefix = "key-"
local sent = 0
local answered = 0
local done_file = nil

local content = string.rep("The quick brown fox jumps over the lazy dog. ", 5)
local body = '{"role":"user","content":"' .. content .. '","metadata":{"client":"wrk","lang":"en"}}'

function init(args)
  prefix = args[1] or prefix
  sessions = tonumber(args[2] or sessions)
  count = tonumber(args[3] or count)
  key_prefix = args[4] or key_prefix
  done_file = args[5]
end

function request()
  sent = sent + 1
  local headers = {["Content-Type"] = "application/json", ["Idempotency-Key"] = key_prefix .. sent}
  return wrk.format("POST", "/v1/sessions/" .. prefix .. (sent % sessions) .. "/messages", headers, body)
end

function response(status, headers, body)
  answered = answered + 1
  if answered == count then
    if done_file then
      local f = io.open(done_file, "w")
      f:write("done\n")
      f:close()
    end
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
      .. '"p50_us":%d,"p99_us":%d,"body_bytes":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), #body))
end
