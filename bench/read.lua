-- wrk script: GET the URL given on the command line (path and query) over and over.
--   wrk -s bench/read.lua 'http://127.0.0.1:PORT/v1/sessions/ID/messages?order=desc&limit=50'
-- done() prints one line "BENCH {json}" that bench/run.py parses.

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
      .. '"p50_us":%d,"p99_us":%d,"body_bytes":0}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
