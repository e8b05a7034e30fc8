-- wrk script: POST ~300-byte messages, round-robin over N sessions.
--   wrk -s bench/append.lua http://127.0.0.1:PORT -- <session-id-prefix> <sessions>
-- Session ids are <prefix>0 .. <prefix>(N-1); the sessions must exist.
-- done() prints one line "BENCH {json}" that bench/run.py parses.

local prefix = "bench-"
local sessions = 64
local counter = 0
local threads = {}

local content = string.rep("The quick brown fox jumps over the lazy dog. ", 5)
local body = '{"role":"user","content":"' .. content .. '","metadata":{"client":"wrk","lang":"en"}}'

function setup(thread)
  -- Threads start at different sessions so they do not move in lockstep.
  thread:set("offset", #threads * 7)
  table.insert(threads, thread)
end

function init(args)
  prefix = args[1] or prefix
  sessions = tonumber(args[2] or sessions)
  counter = tonumber(offset or 0)
  wrk.method = "POST"
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  local id = prefix .. (counter % sessions)
  counter = counter + 1
  return wrk.format(nil, "/v1/sessions/" .. id .. "/messages")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
      .. '"p50_us":%d,"p99_us":%d,"body_bytes":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), #body))
end
